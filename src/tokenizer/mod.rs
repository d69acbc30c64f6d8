//! The CLIP tokenizer: prompt → exactly 77 token ids for the text encoder.
//!
//! It is a `tokenizers::Tokenizer` built the way transformers 5's `CLIPTokenizer` builds its backend,
//! so that a prompt gives the ids diffusers would give and a diffusers image can be reproduced here:
//! - BPE over the 49408-token CLIP vocabulary (`end_of_word_suffix = "</w>"`, unknown → `<|endoftext|>`);
//! - normalizer NFC → `\s+` to one space → lowercase (leading/trailing whitespace and newlines
//!   vanish in the split below; there is no ftfy or HTML unescaping, as in transformers);
//! - pre-tokenizer: CLIP's split regex (the words kept, the spaces removed) then byte-level;
//! - `<|startoftext|>` … `<|endoftext|>` around the tokens (content truncated so the total is 77),
//!   then the pad token (`!`, id 0, in SD 2.x; `<|endoftext|>` in SD 1.x) up to 77.
//!
//! The special tokens, the pad token included, are "added tokens" as in transformers: they are cut
//! out of the prompt before BPE. For SD 2.x that means every `!` in a prompt becomes id 0 on its own,
//! where open_clip (what SD 2.x was trained with) merges runs like `!!` into one BPE token. We follow
//! transformers/diffusers; see `special_tokens` and the test `exclamation_marks_follow_transformers`.
//!
//! The vocabulary comes from the model's `tokenizer/` folder (`tokenizer.json`, or `vocab.json` +
//! `merges.txt`) or, failing that, from open_clip's BPE file embedded in the binary (`vocab.rs`).

mod vocab;

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

use vocab::{BOS, EOS};

/// CLIP's context length, used when `tokenizer_config.json` does not give `model_max_length`.
const DEFAULT_MAX_LEN: usize = 77;
/// SD 2.x pads with "!" (id 0), like open_clip; used when no config file names a pad token.
const DEFAULT_PAD: &str = "!";
/// Largest `model_max_length` taken from a config file; transformers writes 1e30 for "unset".
const MAX_SANE_LEN: u64 = 4096;

/// transformers 5's CLIP split: the special tokens, the contractions, runs of letters, single digits,
/// runs of anything else but whitespace (which is dropped).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Turns a prompt into the text encoder's fixed-length token ids.
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// From a model's `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`; when the folder is missing or has neither, the embedded CLIP vocabulary.
    /// `special_tokens_map.json` / `tokenizer_config.json`, where present, give the pad token and
    /// `model_max_length`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let settings = Settings::read(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        let vocab_json = dir.join("vocab.json");
        let merges_txt = dir.join("merges.txt");
        if tokenizer_json.is_file() {
            let inner = Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
            return Self::finish(inner, settings, &tokenizer_json.display().to_string());
        }
        match (vocab_json.is_file(), merges_txt.is_file()) {
            (true, true) => {
                let (vocab, merges) = vocab::from_files(&vocab_json, &merges_txt)?;
                let source = vocab_json.display().to_string();
                Self::finish(clip_bpe(vocab, merges, &source)?, settings, &source)
            }
            (true, false) => Err(missing(
                merges_txt,
                "the BPE merges that go with vocab.json",
            )),
            (false, true) => Err(missing(
                vocab_json,
                "the vocabulary that goes with merges.txt",
            )),
            (false, false) => {
                tracing::info!(
                    "{}: no tokenizer.json or vocab.json + merges.txt; using the embedded CLIP vocabulary",
                    dir.display()
                );
                Self::finish(embedded_bpe()?, settings, "the embedded CLIP vocabulary")
            }
        }
    }

    /// From open_clip's BPE file inside the binary, padded with "!" to 77 (SD 2.x's settings).
    pub fn embedded() -> Result<Self> {
        let settings = Settings {
            pad_token: None,
            max_len: DEFAULT_MAX_LEN,
        };
        Self::finish(embedded_bpe()?, settings, "the embedded CLIP vocabulary")
    }

    /// Writes a tokenizer folder for the embedded vocabulary, as SD 2.x ships one (`vocab.json`,
    /// `merges.txt`, pad "!" and 77 tokens in `tokenizer_config.json`): [`ClipTokenizer::from_dir`]
    /// and transformers read it to the ids [`ClipTokenizer::embedded`] gives.
    pub fn write_embedded(dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        vocab::write_embedded(dir)?;
        let config = serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!",
            "model_max_length": DEFAULT_MAX_LEN, "do_lower_case": true,
            "add_prefix_space": false, "errors": "replace",
        });
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, config.to_string()).map_err(|e| Error::io(&path, e))
    }

    /// The number of ids `encode` returns (77 for CLIP).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Exactly `max_len` ids: `<|startoftext|>`, the prompt's tokens (truncated so that the total
    /// including `<|endoftext|>` is `max_len`), `<|endoftext|>`, then the pad id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(format!("encoding {text:?}: {e}")))?;
        let ids = encoding.get_ids().to_vec();
        if ids.len() != self.max_len {
            return Err(Error::Tokenizer(format!(
                "encoding {text:?} gave {} ids, expected {}",
                ids.len(),
                self.max_len
            )));
        }
        Ok(ids)
    }

    /// Registers the pad token, sets truncation and fixed padding, and checks that an empty prompt
    /// encodes as `<|startoftext|> <|endoftext|> pad…`.
    fn finish(mut inner: Tokenizer, settings: Settings, source: &str) -> Result<Self> {
        let pad_token = settings
            .pad_token
            .or_else(|| inner.get_padding().map(|p| p.pad_token.clone()))
            .unwrap_or_else(|| DEFAULT_PAD.to_string());
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{source}: the pad token {pad_token:?} is not in the vocabulary"
            ))
        })?;
        if !inner.get_added_vocabulary().is_special_token(&pad_token) {
            inner.add_special_tokens(&[pad_added_token(&pad_token)]);
        }
        let max_len = settings.max_len;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(format!("{source}: truncation to {max_len}: {e}")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        let tokenizer = Self {
            inner,
            max_len,
            pad_id,
        };
        tokenizer.check(source)?;
        Ok(tokenizer)
    }

    /// A `tokenizer.json` without CLIP's post-processor would silently drop the special tokens.
    fn check(&self, source: &str) -> Result<()> {
        let (bos, eos) = match (self.inner.token_to_id(BOS), self.inner.token_to_id(EOS)) {
            (Some(bos), Some(eos)) => (bos, eos),
            _ => {
                return Err(Error::Tokenizer(format!(
                    "{source}: {BOS} or {EOS} is not in the vocabulary"
                )))
            }
        };
        let ids = self.encode("")?;
        if ids.len() < 2
            || ids[0] != bos
            || ids[1] != eos
            || ids[2..].iter().any(|&id| id != self.pad_id)
        {
            return Err(Error::Tokenizer(format!(
                "{source}: an empty prompt encodes as {:?}…, expected [{bos}, {eos}, {}, …] \
                 (is the post-processor CLIP's RobertaProcessing?)",
                &ids[..ids.len().min(4)],
                self.pad_id
            )));
        }
        Ok(())
    }
}

/// transformers 5's CLIP pipeline (`CLIPTokenizer.__init__`) over the given vocabulary, with its
/// special tokens; truncation, padding and the pad token are added by `ClipTokenizer::finish`.
fn clip_bpe(vocab: Vocab, merges: Merges, source: &str) -> Result<Tokenizer> {
    let tk_err =
        |what: &str, e: tokenizers::Error| Error::Tokenizer(format!("{source}: {what}: {e}"));
    let bos_id = vocab.get(BOS).copied();
    let eos_id = vocab.get(EOS).copied();
    let (Some(bos_id), Some(eos_id)) = (bos_id, eos_id) else {
        return Err(Error::Tokenizer(format!(
            "{source}: {BOS} or {EOS} is not in the vocabulary"
        )));
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .unk_token(EOS.to_string())
        .fuse_unk(false)
        .build()
        .map_err(|e| tk_err("building the BPE model", e))?;
    let mut tk = Tokenizer::new(bpe);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| tk_err("whitespace regex", e))?;
    tk.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| tk_err("CLIP split regex", e))?;
    // (add_prefix_space, trim_offsets, use_regex) as transformers sets them; the GPT-2 regex that
    // use_regex adds never splits a chunk CLIP_SPLIT produced, so it is harmless either way.
    tk.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tk.with_post_processor(Some(
        RobertaProcessing::new((EOS.to_string(), eos_id), (BOS.to_string(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    tk.with_decoder(Some(ByteLevel::default()));
    // transformers marks these `normalized: true` (matched after lowercasing, so `<|ENDOFTEXT|>` in a
    // prompt is the end token too).
    tk.add_special_tokens(&[
        AddedToken::from(BOS, true).normalized(true),
        AddedToken::from(EOS, true).normalized(true),
    ]);
    Ok(tk)
}

fn embedded_bpe() -> Result<Tokenizer> {
    let (vocab, merges) = vocab::embedded()?;
    clip_bpe(vocab, merges, "the embedded CLIP vocabulary")
}

/// The pad token as transformers registers it: a special token matched on the raw prompt, so with
/// "!" as pad every "!" in a prompt becomes id 0 by itself (diffusers issue #4153). open_clip does
/// not do this; we follow transformers so that prompts give the ids diffusers gives.
fn pad_added_token(pad_token: &str) -> AddedToken {
    AddedToken::from(pad_token, true).normalized(false)
}

fn missing(path: PathBuf, what: &str) -> Error {
    Error::MissingFile {
        path,
        what: what.to_string(),
    }
}

/// What the folder's config files say: the pad token and the context length.
struct Settings {
    /// None: no config file names one (then tokenizer.json's padding, else "!").
    pad_token: Option<String>,
    max_len: usize,
}

impl Settings {
    /// `special_tokens_map.json` takes precedence over `tokenizer_config.json`, as in transformers.
    /// Missing files (or a missing folder) give the defaults; unreadable ones are errors.
    fn read(dir: &Path) -> Result<Self> {
        let special = read_json(&dir.join("special_tokens_map.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let pad_token = [&special, &config]
            .into_iter()
            .flatten()
            .find_map(|json| token_content(json.get("pad_token")?));
        let max_len = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None => DEFAULT_MAX_LEN,
            Some(value) => match value.as_u64() {
                Some(n) if (3..=MAX_SANE_LEN).contains(&n) => n as usize,
                _ => {
                    tracing::warn!(
                        "{}: model_max_length {value} is not a usable context length; using {DEFAULT_MAX_LEN}",
                        config_path.display()
                    );
                    DEFAULT_MAX_LEN
                }
            },
        };
        Ok(Self { pad_token, max_len })
    }
}

/// A token in a config file: `"!"` or `{"content": "!", ...}`; `null` means none.
fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let value = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(value))
}

#[cfg(test)]
mod tests;
