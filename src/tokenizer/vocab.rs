//! Where the CLIP BPE vocabulary comes from: a model's `vocab.json` + `merges.txt`, or the
//! `bpe_simple_vocab_16e6.txt.gz` embedded in the binary (open_clip's file, the one SD 2.x was
//! trained with). Both give the same 49408-token vocabulary and 48894 ranked merges; the embedded
//! one is rebuilt exactly the way open_clip's `SimpleTokenizer.__init__` does it.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use tokenizers::models::bpe::{Merges, Vocab};

use crate::{Error, Result};

/// Beginning and end of text in the Hugging Face vocabulary. open_clip calls them `<start_of_text>`
/// and `<end_of_text>`; the ids (49406, 49407) are the same.
pub(crate) const BOS: &str = "<|startoftext|>";
pub(crate) const EOS: &str = "<|endoftext|>";

/// open_clip's BPE file, compressed (1.3 MB).
const EMBEDDED_GZ: &[u8] = include_bytes!("bpe_simple_vocab_16e6.txt.gz");

/// Merges open_clip keeps: `lines[1:49152-256-2+1]` (line 0 is the version header). With the 512
/// byte tokens (bare and `</w>`) and the 2 special tokens that makes a 49408-token vocabulary.
const OPEN_CLIP_MERGES: usize = 49152 - 256 - 2;

/// The vocabulary and merges from open_clip's embedded file.
pub(crate) fn embedded() -> Result<(Vocab, Merges)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(EMBEDDED_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Tokenizer(format!("embedded bpe_simple_vocab_16e6.txt.gz: {e}")))?;
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() < OPEN_CLIP_MERGES + 1 {
        return Err(Error::Tokenizer(format!(
            "embedded bpe_simple_vocab_16e6.txt.gz has {} lines, expected at least {}",
            lines.len(),
            OPEN_CLIP_MERGES + 1
        )));
    }
    let mut merges = Merges::with_capacity(OPEN_CLIP_MERGES);
    for (i, line) in lines[1..=OPEN_CLIP_MERGES].iter().enumerate() {
        let merge = parse_merge(line).ok_or_else(|| {
            Error::Tokenizer(format!(
                "embedded bpe_simple_vocab_16e6.txt.gz line {}: expected two symbols, found {line:?}",
                i + 2
            ))
        })?;
        merges.push(merge);
    }

    // vocab = bytes_to_unicode() values, then each + "</w>", then every merge joined, then specials.
    let bytes: Vec<char> = bytes_to_unicode().into_iter().map(|(_, c)| c).collect();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.to_string());
    tokens.push(EOS.to_string());

    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.into_iter().enumerate() {
        // Ids are below 49408, so the cast cannot truncate.
        if let Some(previous) = vocab.insert(token.clone(), id as u32) {
            return Err(Error::Tokenizer(format!(
                "embedded bpe_simple_vocab_16e6.txt.gz: token {token:?} occurs twice (ids {previous} and {id})"
            )));
        }
    }
    Ok((vocab, merges))
}

/// GPT-2/CLIP's reversible byte → printable character map, in open_clip's order: the 188 printable
/// bytes map to themselves, the other 68 to U+0100.. in increasing byte order.
pub(crate) fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map: Vec<(u8, char)> = printable.iter().map(|&b| (b, char::from(b))).collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable.contains(&b) {
            // 256 + n < 324: always a valid scalar value.
            map.push((
                b,
                char::from_u32(256 + n).unwrap_or(char::REPLACEMENT_CHARACTER),
            ));
            n += 1;
        }
    }
    map
}

/// A model's `vocab.json` (token → id) and `merges.txt` (`#version` header, then one "a b" per line).
/// Writes the embedded vocabulary as a model folder's `vocab.json` and `merges.txt` (the files
/// transformers' `CLIPTokenizer` reads; [`from_files`] reads them back to the same vocabulary).
pub(crate) fn write_embedded(dir: &Path) -> Result<()> {
    let (vocab, merges) = embedded()?;
    let ordered: std::collections::BTreeMap<u32, &String> =
        vocab.iter().map(|(token, &id)| (id, token)).collect();
    let json: serde_json::Map<String, serde_json::Value> = ordered
        .into_iter()
        .map(|(id, token)| (token.clone(), serde_json::Value::from(id)))
        .collect();
    let vocab_path = dir.join("vocab.json");
    let text = serde_json::to_string(&json).map_err(|source| Error::Json {
        path: vocab_path.clone(),
        source,
    })?;
    std::fs::write(&vocab_path, text).map_err(|e| Error::io(&vocab_path, e))?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    let merges_path = dir.join("merges.txt");
    std::fs::write(&merges_path, text).map_err(|e| Error::io(&merges_path, e))
}

pub(crate) fn from_files(vocab_path: &Path, merges_path: &Path) -> Result<(Vocab, Merges)> {
    let bytes = std::fs::read(vocab_path).map_err(|e| Error::io(vocab_path, e))?;
    let map: HashMap<String, u32> =
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: vocab_path.to_path_buf(),
            source,
        })?;
    let mut seen = HashSet::with_capacity(map.len());
    for (token, id) in &map {
        if !seen.insert(*id) {
            return Err(Error::Tokenizer(format!(
                "{}: id {id} is used twice (one of them by {token:?})",
                vocab_path.display()
            )));
        }
    }
    let vocab: Vocab = map.into_iter().collect();

    let text = std::fs::read_to_string(merges_path).map_err(|e| Error::io(merges_path, e))?;
    let mut merges = Merges::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let merge = parse_merge(line).ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} line {}: expected two symbols separated by a space, found {line:?}",
                merges_path.display(),
                i + 1
            ))
        })?;
        merges.push(merge);
    }
    Ok((vocab, merges))
}

/// "a b" → ("a", "b"); anything else → None.
fn parse_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}
