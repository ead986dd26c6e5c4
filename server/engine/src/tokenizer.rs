//! CLIP byte-level BPE tokenizer, matching Hugging Face transformers' `CLIPTokenizer`
//! (the `tokenizers`-backed one) id for id.
//!
//! The steps, in the order the `tokenizers` library runs them for a CLIP `tokenizer.json`:
//! 1. special tokens (bos / eos / unk / pad and any added tokens) are cut out of the raw
//!    text, matched literally and case-sensitively, before any normalisation;
//! 2. each remaining piece is normalised: NFC, every whitespace run becomes one space, lowercase;
//! 3. the CLIP regex splits it into words (whitespace is dropped), and the GPT-2 byte-level
//!    regex splits those once more (this only matters for a typed `<|endoftext|>` that was
//!    not a special-token match, e.g. one in capitals);
//! 4. each word's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`), the
//!    last one gets the `</w>` end-of-word suffix, and the BPE merges are applied by rank;
//! 5. `<|startoftext|>` + ids + `<|endoftext|>`, truncated to `max_len` keeping the ends,
//!    padded with the pad id.
//!
//! SD 2.x tokenizers name `!` (id 0) as pad token. transformers then treats every `!` in a
//! prompt as that special token (one id 0 per `!`, huggingface/diffusers#4153) where
//! open_clip would produce BPE ids for `!!!`; this module follows transformers, since that is
//! what diffusers-trained models saw.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// Context length of every CLIP text encoder Stable Diffusion uses.
pub const DEFAULT_MAX_LEN: usize = 77;

const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// CLIP's pre-tokenizer pattern (transformers `tokenization_clip`, `tokenizer.json` Split).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level pattern, without its whitespace alternatives: it is only applied to
/// CLIP words, which never contain whitespace.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+";

/// Words whose BPE result is remembered; the cache is emptied when it grows past this.
const CACHE_LIMIT: usize = 65_536;

/// One prompt turned into model input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// `<|startoftext|>`, the BPE ids, `<|endoftext|>`, then padding: always `max_len` long.
    pub ids: Vec<u32>,
    /// Number of real tokens (bos and eos included) after truncation; `ids[length..]` is padding.
    pub length: usize,
    /// Whether the prompt had more tokens than fit.
    pub truncated: bool,
    /// Number of tokens (bos and eos included) before truncation.
    pub untruncated_length: usize,
}

/// A CLIP BPE tokenizer loaded from a diffusers `tokenizer/` folder.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    id_to_token: HashMap<u32, String>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_encoder: [char; 256],
    byte_decoder: HashMap<char, u8>,
    /// Tokens cut out of the raw text before normalisation, longest first.
    specials: Vec<(String, u32)>,
    suffix: String,
    unk_id: Option<u32>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_len: usize,
    whitespace: Regex,
    clip_split: Regex,
    byte_level_split: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// Special-token names and the context length, from `tokenizer_config.json` /
/// `special_tokens_map.json` where present.
struct SpecialConfig {
    bos: String,
    eos: String,
    pad: String,
    unk: String,
    max_len: usize,
    /// transformers' `added_tokens_decoder`: (content, id).
    added: Vec<(String, u32)>,
}

/// Vocabulary and merges as read from disk, before ids are resolved.
struct BpeFiles {
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    suffix: String,
    added: Vec<(String, u32)>,
    /// File the merges came from, for error messages.
    merges_path: PathBuf,
}

impl ClipTokenizer {
    /// Loads `vocab.json` + `merges.txt` (what SD checkpoints on the hub ship), or
    /// `tokenizer.json` when those two are absent, plus `tokenizer_config.json` /
    /// `special_tokens_map.json` for the special tokens and `model_max_length` (default 77).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let files = read_bpe_files(dir)?;
        let config = read_special_config(dir)?;
        Self::build(files, config)
    }

    fn build(files: BpeFiles, config: SpecialConfig) -> Result<Self> {
        let BpeFiles { mut vocab, merges: merge_pairs, suffix, added, merges_path } = files;
        for (content, id) in added.iter().chain(config.added.iter()) {
            vocab.entry(content.clone()).or_insert(*id);
        }
        let mut merges = HashMap::with_capacity(merge_pairs.len());
        for (rank, (a, b)) in merge_pairs.iter().enumerate() {
            let lookup = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| Error::Tokenizer {
                    path: merges_path.clone(),
                    message: format!("merge {} ({a} {b}) uses {t:?}, which is not in the vocabulary", rank + 1),
                })
            };
            let left = lookup(a)?;
            let right = lookup(b)?;
            let merged = lookup(&format!("{a}{b}"))?;
            // A repeated pair keeps its first (best) rank, as the reference implementations do.
            merges.entry((left, right)).or_insert((rank as u32, merged));
        }

        let special_id = |name: &str, what: &str| {
            vocab.get(name).copied().ok_or_else(|| Error::Tokenizer {
                path: merges_path.clone(),
                message: format!("{what} token {name:?} is not in the vocabulary"),
            })
        };
        let bos_id = special_id(&config.bos, "bos")?;
        let eos_id = special_id(&config.eos, "eos")?;
        let pad_id = special_id(&config.pad, "pad")?;
        let unk_id = vocab.get(&config.unk).copied();

        let mut specials: Vec<(String, u32)> =
            vec![(config.bos.clone(), bos_id), (config.eos.clone(), eos_id), (config.pad.clone(), pad_id)];
        if let Some(id) = unk_id {
            specials.push((config.unk.clone(), id));
        }
        specials.extend(added.into_iter().chain(config.added).filter_map(|(c, _)| vocab.get(&c).map(|&id| (c, id))));
        specials.retain(|(c, _)| !c.is_empty());
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        specials.dedup_by(|a, b| a.0 == b.0);

        let byte_encoder = bytes_to_unicode();
        let byte_decoder = byte_encoder.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let id_to_token = vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
        Ok(Self {
            vocab,
            id_to_token,
            merges,
            byte_encoder,
            byte_decoder,
            specials,
            suffix,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            max_len: config.max_len,
            whitespace: Regex::new(r"\s+").expect("static regex"),
            clip_split: Regex::new(CLIP_PATTERN).expect("static regex"),
            byte_level_split: Regex::new(BYTE_LEVEL_PATTERN).expect("static regex"),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Context length: every [`Encoding::ids`] has this many ids (77 for SD).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Id of `<|startoftext|>` (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>` (49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding: 49407 for SD 1.x, 0 (`!`) for SD 2.x.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of entries in the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Id of a vocabulary entry given in its stored form (e.g. `"cat</w>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Tokenizes `text` as `tokenizer(text, padding="max_length", truncation=True)` does.
    pub fn encode(&self, text: &str) -> Encoding {
        let body = self.encode_unpadded(text);
        let room = self.max_len - 2;
        let untruncated_length = body.len() + 2;
        let truncated = body.len() > room;
        let kept = &body[..body.len().min(room)];
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos_id);
        ids.extend_from_slice(kept);
        ids.push(self.eos_id);
        let length = ids.len();
        ids.resize(self.max_len, self.pad_id);
        Encoding { ids, length, truncated, untruncated_length }
    }

    /// The BPE ids of `text` without `<|startoftext|>` / `<|endoftext|>`, untruncated.
    pub fn encode_unpadded(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match self.find_special(rest) {
                Some((start, len, id)) => {
                    self.encode_plain(&rest[..start], &mut out);
                    out.push(id);
                    rest = &rest[start + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// Turns ids back into text; `<|startoftext|>` and `<|endoftext|>` are skipped, and
    /// each end-of-word suffix becomes a space. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if id == self.bos_id || id == self.eos_id {
                continue;
            }
            let Some(token) = self.id_to_token.get(&id) else { continue };
            let (body, end_of_word) = match token.strip_suffix(self.suffix.as_str()) {
                Some(body) if !self.suffix.is_empty() => (body, true),
                _ => (token.as_str(), false),
            };
            for c in body.chars() {
                match self.byte_decoder.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            if end_of_word {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Leftmost special-token match in `text`, longest first at equal positions:
    /// (byte offset, byte length, id).
    fn find_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        text.char_indices().find_map(|(i, _)| {
            self.specials.iter().find(|(s, _)| text[i..].starts_with(s.as_str())).map(|(s, id)| (i, s.len(), *id))
        })
    }

    /// Normalises, splits and BPE-encodes text that holds no special-token match.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = self.normalize(text);
        for word in self.clip_split.find_iter(&normalized) {
            for piece in self.byte_level_split.find_iter(word.as_str()) {
                self.bpe(piece.as_str(), out);
            }
        }
    }

    /// NFC, whitespace runs to one space, then a per-character lowercase (the `tokenizers`
    /// `Lowercase` normalizer maps characters one by one, so a final Σ becomes σ, not ς).
    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        self.whitespace.replace_all(&nfc, " ").chars().flat_map(char::to_lowercase).collect()
    }

    /// BPE-encodes one pre-tokenized word.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.cache.lock().ok().and_then(|c| c.get(word).cloned()) {
            out.extend(ids);
            return;
        }
        let mapped: Vec<char> = word.bytes().map(|b| self.byte_encoder[b as usize]).collect();
        let mut symbols: Vec<u32> = Vec::with_capacity(mapped.len());
        let mut buf = String::new();
        for (i, &c) in mapped.iter().enumerate() {
            buf.clear();
            buf.push(c);
            if i + 1 == mapped.len() {
                buf.push_str(&self.suffix);
            }
            // Every byte character is in a CLIP vocabulary; a stripped-down vocabulary falls
            // back to unk like the `tokenizers` BPE model does.
            if let Some(id) = self.vocab.get(&buf).copied().or(self.unk_id) {
                symbols.push(id);
            }
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|&(rank, merged)| (rank, w[0], w[1], merged)))
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, left, right, merged)) = best else { break };
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }
        out.extend_from_slice(&symbols);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(word.to_string(), symbols);
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the other 68 to U+0100 onwards, in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("U+0100..U+0143 are valid chars")
        };
    }
    table
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Tokenizer { path: path.to_path_buf(), message: e.to_string() })
}

fn parse_vocab(path: &Path, value: &Value) -> Result<HashMap<String, u32>> {
    let bad = |message: String| Error::Tokenizer { path: path.to_path_buf(), message };
    let map = value.as_object().ok_or_else(|| bad("vocabulary is not a JSON object".into()))?;
    map.iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(format!("token {token:?} has id {id}, not a u32")))?;
            Ok((token.clone(), id))
        })
        .collect()
}

/// Reads `vocab.json` + `merges.txt`, or `tokenizer.json` where either is missing.
fn read_bpe_files(dir: &Path) -> Result<BpeFiles> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let json_path = dir.join("tokenizer.json");
    if vocab_path.is_file() && merges_path.is_file() {
        let vocab = parse_vocab(&vocab_path, &read_json(&vocab_path)?)?;
        let text = read_text(&merges_path)?;
        let mut merges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').filter(|(_, b)| !b.contains(' ')).ok_or_else(|| Error::Tokenizer {
                path: merges_path.clone(),
                message: format!("line {}: expected two tokens separated by one space, found {line:?}", n + 1),
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        return Ok(BpeFiles { vocab, merges, suffix: END_OF_WORD.to_string(), added: Vec::new(), merges_path });
    }
    if json_path.is_file() {
        return read_tokenizer_json(&json_path);
    }
    let missing = if vocab_path.is_file() { &merges_path } else { &vocab_path };
    Err(Error::Tokenizer {
        path: missing.clone(),
        message: "file not found; a CLIP tokenizer folder needs vocab.json and merges.txt (or tokenizer.json)".into(),
    })
}

/// Reads a `tokenizers` library file holding a BPE model.
fn read_tokenizer_json(path: &Path) -> Result<BpeFiles> {
    let bad = |message: String| Error::Tokenizer { path: path.to_path_buf(), message };
    let root = read_json(path)?;
    let model = root.get("model").ok_or_else(|| bad("no \"model\" entry".into()))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        if kind != "BPE" {
            return Err(bad(format!("model type {kind:?} is not BPE")));
        }
    }
    let vocab = parse_vocab(path, model.get("vocab").ok_or_else(|| bad("model has no vocab".into()))?)?;
    let list = model.get("merges").and_then(Value::as_array).ok_or_else(|| bad("model has no merges list".into()))?;
    let mut merges = Vec::with_capacity(list.len());
    for (n, entry) in list.iter().enumerate() {
        // Older files store "a b", newer ones ["a", "b"].
        let pair = match entry {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(v) if v.len() == 2 => {
                v[0].as_str().zip(v[1].as_str()).map(|(a, b)| (a.to_string(), b.to_string()))
            }
            _ => None,
        };
        merges.push(pair.ok_or_else(|| bad(format!("merge {n} is not a pair: {entry}")))?);
    }
    let suffix = model.get("end_of_word_suffix").and_then(Value::as_str).unwrap_or(END_OF_WORD).to_string();
    let added = root
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(|tokens| {
            tokens
                .iter()
                .filter_map(|t| {
                    let content = t.get("content")?.as_str()?.to_string();
                    let id = u32::try_from(t.get("id")?.as_u64()?).ok()?;
                    Some((content, id))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(BpeFiles { vocab, merges, suffix, added, merges_path: path.to_path_buf() })
}

/// A special token in transformers' configs: a plain string or an `AddedToken` object.
fn token_name(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_special_config(dir: &Path) -> Result<SpecialConfig> {
    let mut config = SpecialConfig {
        bos: BOS_TOKEN.into(),
        eos: EOS_TOKEN.into(),
        pad: EOS_TOKEN.into(),
        unk: EOS_TOKEN.into(),
        max_len: DEFAULT_MAX_LEN,
        added: Vec::new(),
    };
    // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let value = read_json(&path)?;
        for (key, slot) in [
            ("bos_token", &mut config.bos),
            ("eos_token", &mut config.eos),
            ("pad_token", &mut config.pad),
            ("unk_token", &mut config.unk),
        ] {
            if let Some(name) = value.get(key).and_then(token_name) {
                *slot = name;
            }
        }
        if let Some(n) = value.get("model_max_length").and_then(Value::as_f64) {
            // Tokenizers without a limit store a huge sentinel (1e30); keep CLIP's 77 then.
            if n.fract() == 0.0 && (3.0..=1_048_576.0).contains(&n) {
                config.max_len = n as usize;
            } else {
                tracing::debug!(path = %path.display(), model_max_length = n, "ignoring model_max_length; using {DEFAULT_MAX_LEN}");
            }
        }
        if let Some(added) = value.get("added_tokens_decoder").and_then(Value::as_object) {
            for (id, token) in added {
                if let (Ok(id), Some(content)) = (id.parse::<u32>(), token_name(token)) {
                    config.added.push((content, id));
                }
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/sd-tiny");

    fn fixture_dir() -> PathBuf {
        Path::new(FIXTURES).join("pipeline/tokenizer")
    }

    fn fixture_tokenizer() -> ClipTokenizer {
        let dir = fixture_dir();
        ClipTokenizer::from_dir(&dir)
            .unwrap_or_else(|e| panic!("loading the fixture tokenizer from {}: {e}", dir.display()))
    }

    /// Prompts and expected ids / lengths from `tokenizer_ids.{json,safetensors}`, made with
    /// transformers' CLIPTokenizer (padding="max_length", max_length=77, truncation=True).
    struct FixtureCases {
        prompts: Vec<String>,
        ids: Vec<Vec<i64>>,
        lengths: Vec<i64>,
    }

    fn fixture_cases() -> anyhow::Result<FixtureCases> {
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(Path::new(FIXTURES).join("tokenizer_ids.json"))?)?;
        let prompts: Vec<String> = serde_json::from_value(json["inputs"]["prompts"].clone())?;
        let tensors = candle_core::safetensors::load(
            Path::new(FIXTURES).join("tokenizer_ids.safetensors"),
            &candle_core::Device::Cpu,
        )?;
        let ids = tensors.get("input_ids").ok_or_else(|| anyhow::anyhow!("no input_ids"))?.to_vec2::<i64>()?;
        let lengths = tensors.get("lengths").ok_or_else(|| anyhow::anyhow!("no lengths"))?.to_vec1::<i64>()?;
        anyhow::ensure!(prompts.len() == ids.len() && prompts.len() == lengths.len(), "fixture sizes disagree");
        Ok(FixtureCases { prompts, ids, lengths })
    }

    fn check_all_fixture_prompts(tok: &ClipTokenizer) -> anyhow::Result<()> {
        let FixtureCases { prompts, ids, lengths } = fixture_cases()?;
        assert_eq!(prompts.len(), 10);
        for ((prompt, expected), &length) in prompts.iter().zip(&ids).zip(&lengths) {
            let enc = tok.encode(prompt);
            let got: Vec<i64> = enc.ids.iter().map(|&i| i64::from(i)).collect();
            assert_eq!(&got, expected, "ids for {prompt:?}");
            assert_eq!(enc.length as i64, length, "length for {prompt:?}");
        }
        Ok(())
    }

    #[test]
    fn fixture_path_resolves_to_shared() {
        let canonical = std::fs::canonicalize(fixture_dir()).expect("fixture dir exists");
        assert!(canonical.ends_with("shared/fixtures/sd-tiny/pipeline/tokenizer"), "{}", canonical.display());
    }

    #[test]
    fn matches_transformers_on_every_fixture_prompt() -> anyhow::Result<()> {
        let tok = fixture_tokenizer();
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_len()), (49406, 49407, 49407, 77));
        assert_eq!(tok.vocab_size(), 49408);
        check_all_fixture_prompts(&tok)?;
        // A second pass runs from the BPE cache and must agree.
        check_all_fixture_prompts(&tok)
    }

    #[test]
    fn tokenizer_json_alone_gives_the_same_ids() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture_dir().join(name), dir.path().join(name))?;
        }
        let tok = ClipTokenizer::from_dir(dir.path())?;
        check_all_fixture_prompts(&tok)
    }

    #[test]
    fn truncation_flags_and_lengths() -> anyhow::Result<()> {
        let tok = fixture_tokenizer();
        let prompts = fixture_cases()?.prompts;
        let long = tok.encode(&prompts[9]);
        assert!(long.truncated);
        assert_eq!((long.length, long.untruncated_length, long.ids.len()), (77, 198, 77));
        assert_eq!(long.ids[76], tok.eos_id());

        let short = tok.encode(&prompts[0]);
        assert!(!short.truncated);
        assert_eq!((short.length, short.untruncated_length), (10, 10));

        // "a" is one token: 75 of them fill the context exactly, 76 do not fit.
        let exact = tok.encode(&"a ".repeat(75));
        assert_eq!((exact.truncated, exact.length, exact.untruncated_length), (false, 77, 77));
        let over = tok.encode(&"a ".repeat(76));
        assert_eq!((over.truncated, over.length, over.untruncated_length), (true, 77, 78));
        assert_eq!(over.ids[76], tok.eos_id());

        let empty = tok.encode("");
        assert_eq!((empty.truncated, empty.length), (false, 2));
        assert_eq!(&empty.ids[..3], &[49406, 49407, 49407]);
        Ok(())
    }

    #[test]
    fn unpadded_ids_have_no_bos_or_eos() {
        let tok = fixture_tokenizer();
        assert_eq!(
            tok.encode_unpadded("a photograph of an astronaut riding a horse"),
            vec![320, 8853, 539, 550, 18376, 6765, 320, 4558]
        );
        assert!(tok.encode_unpadded("   \t\n").is_empty());
    }

    #[test]
    fn special_tokens_in_the_text_are_matched_before_normalisation() {
        let tok = fixture_tokenizer();
        let a = tok.encode_unpadded("a");
        let ids = tok.encode_unpadded("a<|endoftext|>a");
        assert_eq!(ids, [a.clone(), vec![49407], a.clone()].concat());
        // Capitals are not a special-token match; after lowercasing the byte-level regex splits it.
        let upper = tok.encode_unpadded("<|ENDOFTEXT|>");
        assert!(!upper.contains(&49407));
        assert_eq!(
            upper,
            [tok.encode_unpadded("<|"), tok.encode_unpadded("endoftext"), tok.encode_unpadded("|>")].concat()
        );
    }

    #[test]
    fn sd2_pad_token_is_honoured() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for name in ["vocab.json", "merges.txt"] {
            std::fs::copy(fixture_dir().join(name), dir.path().join(name))?;
        }
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"__type": "AddedToken", "content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
                "pad_token": "!", "unk_token": "<|endoftext|>", "model_max_length": 77}"#,
        )?;
        let tok = ClipTokenizer::from_dir(dir.path())?;
        assert_eq!(tok.pad_id(), 0);
        let enc = tok.encode("a cat");
        assert_eq!(enc.length, 4);
        assert!(enc.ids[4..].iter().all(|&i| i == 0));
        // As in transformers (diffusers#4153): each "!" is the pad token, id 0.
        assert_eq!(tok.encode_unpadded("! !! !!!"), vec![0; 6]);
        Ok(())
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = ClipTokenizer::from_dir(dir.path()).expect_err("empty folder");
        let message = err.to_string();
        assert!(message.contains("vocab.json"), "{message}");
        assert!(message.contains(&dir.path().display().to_string()), "{message}");

        std::fs::copy(fixture_dir().join("vocab.json"), dir.path().join("vocab.json")).expect("copy");
        let message = ClipTokenizer::from_dir(dir.path()).expect_err("no merges").to_string();
        assert!(message.contains("merges.txt"), "{message}");
    }

    #[test]
    fn malformed_merges_are_reported_with_the_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(fixture_dir().join("vocab.json"), dir.path().join("vocab.json")).expect("copy");
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\ni n\nthree tokens here\n").expect("write");
        let message = ClipTokenizer::from_dir(dir.path()).expect_err("bad merges").to_string();
        assert!(message.contains("merges.txt") && message.contains("line 3"), "{message}");
    }

    #[test]
    fn decode_inverts_encode_up_to_normalisation() {
        let tok = fixture_tokenizer();
        for (text, expected) in [
            ("a photograph of an astronaut", "a photograph of an astronaut"),
            ("Café   crème 🐱🚀, 東京", "café crème 🐱🚀, 東京"),
            ("(masterpiece:1.2)", "( masterpiece : 1 . 2 )"),
        ] {
            assert_eq!(tok.decode(&tok.encode(text).ids[..tok.encode(text).length]), expected, "{text:?}");
        }
    }

    #[test]
    fn byte_map_is_a_bijection_onto_printable_chars() {
        let table = bytes_to_unicode();
        let distinct: std::collections::HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{120}');
        assert!(table.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }
}
