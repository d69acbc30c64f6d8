"""Generate the correctness fixtures for sd21 (tests/fixtures/).

What it writes (all built locally, no network / no Hugging Face Hub access):

* tests/fixtures/tiny-sd21/tokenizer/   CLIP BPE tokenizer files (vocab.json, merges.txt,
  special_tokens_map.json, tokenizer_config.json) derived from open_clip's bundled
  bpe_simple_vocab_16e6.txt.gz exactly like open_clip's SimpleTokenizer builds its vocabulary,
  in the format of the stabilityai/stable-diffusion-2-1 repo's tokenizer/ folder (no tokenizer.json).
* src/tokenizer/bpe_simple_vocab_16e6.txt.gz   a copy of that gz file (embedded by the Rust binary).
* tests/fixtures/reference/tokens.json  tokenizer goldens (transformers CLIPTokenizer vs open_clip).
* tests/fixtures/tiny-sd21/             a tiny random-weight model with the real SD 2.1 architecture,
  saved in the diffusers layout (f32 safetensors).
* tests/fixtures/reference/*.safetensors|json   reference outputs of the text encoder, UNet, VAE
  decoder, torch CPU randn streams, the schedulers' timesteps/sigmas and whole pipeline images.

Install (Python 3.11, CPU is enough):

    pip install torch==2.15.0 diffusers==0.42.1 transformers==5.24.0 open_clip_torch==3.3.0 safetensors

Run from the repository root (output is deterministic: fixed torch seeds, fixed inputs):

    python scripts/make_fixtures.py            # everything
    python scripts/make_fixtures.py tokenizer  # only the tokenizer files and tokens.json
"""

import gzip
import json
import os
import shutil
import sys

import torch

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL_DIR = os.path.join(FIX, "tiny-sd21")
TOK_DIR = os.path.join(MODEL_DIR, "tokenizer")
REF_DIR = os.path.join(FIX, "reference")


def write_json(path, obj, indent=2):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Priority 1: tokenizer files and goldens
# --------------------------------------------------------------------------------------------

def bytes_to_unicode():
    """Same table as CLIP / open_clip: printable bytes map to themselves, the others to U+0100.."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_bpe_path():
    import open_clip
    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def make_tokenizer_files():
    """Write tokenizer/ like stabilityai/stable-diffusion-2-1 and copy the gz into src/tokenizer/."""
    gz = open_clip_bpe_path()
    os.makedirs(TOK_DIR, exist_ok=True)
    os.makedirs(os.path.join(ROOT, "src", "tokenizer"), exist_ok=True)
    shutil.copyfile(gz, os.path.join(ROOT, "src", "tokenizer", "bpe_simple_vocab_16e6.txt.gz"))

    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merge_lines = lines[1:49152 - 256 - 2 + 1]  # 48894 merges; lines[0] is the version header
    merges = [tuple(m.split()) for m in merge_lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    encoder = {tok: i for i, tok in enumerate(vocab)}

    # vocab.json: one line, like the HF repo's file (serde/json parsers accept either form).
    with open(os.path.join(TOK_DIR, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(TOK_DIR, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(" ".join(m) + "\n")

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    write_json(os.path.join(TOK_DIR, "special_tokens_map.json"), {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "pad_token": "!",
        "unk_token": added("<|endoftext|>"),
    })
    write_json(os.path.join(TOK_DIR, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **added("<|startoftext|>")},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **added("<|endoftext|>")},
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "stabilityai/stable-diffusion-2-1",
        "pad_token": "!",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **added("<|endoftext|>")},
    })


LONG_TEXT = " ".join(
    ("a highly detailed matte painting of a quiet harbor town at dawn with fishing boats "
     "gulls mist and warm light on old stone houses trending on artstation by several "
     "famous painters volumetric lighting octane render ultra sharp focus intricate "
     "ornate composition cinematic color grading golden hour reflections on calm water "
     "wooden piers ropes nets lanterns cobblestone streets cats sleeping on windowsills "
     "children running flags fluttering distant mountains snow peaks soft clouds pastel "
     "sky rich textures film grain masterpiece best quality award winning photograph").split()[:120])

TOKEN_TEXTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "A PHOTOGRAPH OF AN ASTRONAUT Riding A Horse",
    "Hello, world!!! (masterpiece:1.2), [best quality]; {x|y} -- ok?! ...",
    "1girl 2024 3.5mm",
    "it's, don't, we'll, they're",
    "café naïve Ünïcödé",
    "富士山の上に浮かぶ猫",
    "一只在月球上的熊猫",
    "a cat 🐱 and a dog 🐶 in space 🌌",
    "🚀!!",
    "launch 🚀!! now",
    "  multiple   spaces\n\nnew lines\tand\ttabs  ",
    "<b>bold</b> &amp; <i>italic</i> &lt;tag&gt; <a href=\"x\">link</a>",
    LONG_TEXT,
    "a prompt with <|endoftext|> literally inside",
    "Illustration of a Stable Diffusion FastAPI API, comic novel, ligth pastel colors",
    "a photo of a red car, 4k, hdr, 8k uhd, dslr",
    "don't stop believin' — em-dash “quotes” ‘single’",
    "x",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "e=mc^2 + 3*4/5 = 7.4 100% #hashtag @user $5",
    "snake_case_words and CamelCaseWords and kebab-case-words",
    "Straße Œuvre ÆØÅ ß",
    "a,b,c,d,e,f,g",
]


def make_token_goldens():
    import open_clip
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(TOK_DIR)
    oc = open_clip.get_tokenizer("ViT-H-14")  # SD 2.x's text tower: the default SimpleTokenizer
    out = []
    n_diff = 0
    for text in TOKEN_TEXTS:
        ids = hf(text, padding="max_length", max_length=77, truncation=True).input_ids
        oc_ids = oc([text])[0].tolist()
        assert len(ids) == 77 and len(oc_ids) == 77
        if ids != oc_ids:
            n_diff += 1
            print(f"  tokenizers differ on {text!r}:\n    hf={ids[:20]}\n    oc={oc_ids[:20]}")
        out.append({"text": text, "ids": ids, "open_clip_ids": oc_ids})
    os.makedirs(REF_DIR, exist_ok=True)
    with open(os.path.join(REF_DIR, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"tokens.json: {len(out)} texts, {n_diff} differ between transformers and open_clip")


def main():
    stages = sys.argv[1:] or ["tokenizer", "model", "reference"]
    if "tokenizer" in stages:
        make_tokenizer_files()
        make_token_goldens()


if __name__ == "__main__":
    main()
