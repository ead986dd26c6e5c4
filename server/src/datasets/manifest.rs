//! Hashes and the `.dir` manifest, byte for byte as DVC 3 writes them.
//!
//! A file's hash is the plain MD5 of its bytes (DVC 3's `hash: md5`), as 32 lower-case hex
//! digits. A folder's hash is the MD5 of its manifest plus the suffix `.dir`. The manifest
//! is what Python's `json.dumps(entries, sort_keys=True)` writes (DVC serialises its tree
//! that way): a JSON list of `{"md5": ..., "relpath": ...}` objects sorted by `relpath`
//! (code-point order, which is UTF-8 byte order), separators `", "` and `": "`, every
//! character outside printable ASCII escaped as `\uXXXX` (lower-case hex, UTF-16 surrogate
//! pairs above the BMP), and no trailing newline. `relpath` uses `/` between folders.

use std::io::Read;
use std::path::Path;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// One file of a folder version: its MD5 (hex) and its path inside the folder (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entry {
    pub md5: String,
    pub relpath: String,
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// MD5 of `bytes`, hex.
pub fn md5_bytes(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

/// MD5 of a file's bytes, hex, read in 1 MiB pieces; `progress` gets the bytes read.
///
/// # Errors
/// The file cannot be read.
pub fn md5_file(path: &Path, progress: &mut dyn FnMut(u64)) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress(n as u64);
    }
    Ok(hex(&hasher.finalize()))
}

/// `text` as a JSON string the way Python's `json.dumps` (with its default
/// `ensure_ascii=True`) writes it, quotes included.
pub fn python_json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// The manifest bytes of `entries` (sorted here by `relpath`), exactly as DVC writes them.
pub fn manifest_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.relpath.cmp(&b.relpath));
    let items: Vec<String> = sorted
        .iter()
        .map(|e| format!("{{\"md5\": {}, \"relpath\": {}}}", python_json_string(&e.md5), python_json_string(&e.relpath)))
        .collect();
    format!("[{}]", items.join(", ")).into_bytes()
}

/// The folder hash of `entries`: MD5 of [`manifest_bytes`] plus `.dir`.
pub fn dir_hash(entries: &[Entry]) -> String {
    format!("{}.dir", md5_bytes(&manifest_bytes(entries)))
}

/// Reads a manifest (any JSON list of `{"md5", "relpath"}`; other keys such as DVC's
/// optional metadata are ignored), sorted by `relpath`.
///
/// # Errors
/// Not such a JSON list, or an entry with an unusable path (absolute, `..`, empty).
pub fn parse_manifest(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = serde_json::from_slice(bytes).map_err(|e| format!("not a DVC .dir manifest: {e}"))?;
    for e in &entries {
        if !safe_relpath(&e.relpath) || !is_md5(&e.md5) {
            return Err(format!("not a DVC .dir manifest: bad entry {:?} ({})", e.relpath, e.md5));
        }
    }
    entries.sort_by(|a, b| a.relpath.cmp(&b.relpath));
    Ok(entries)
}

/// Whether `hash` is 32 hex digits.
pub fn is_md5(hash: &str) -> bool {
    hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `relpath` stays inside its folder: relative, no `..`, `.` or empty parts (and
/// on Windows no `\\`, a separator there; elsewhere it is an ordinary character of a name).
pub fn safe_relpath(relpath: &str) -> bool {
    !relpath.is_empty() && !relpath.starts_with('/') && !(cfg!(windows) && relpath.contains('\\')) && !relpath.contains('\0') && relpath.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(relpath: &str, md5: &str) -> Entry {
        Entry { md5: md5.into(), relpath: relpath.into() }
    }

    #[test]
    fn manifest_bytes_are_what_python_json_dumps_writes() {
        // Expected bytes from python3:
        // json.dumps(sorted([{"md5": "0"*32, "relpath": "b/ü é.png"}, {"md5": "f"*32, "relpath": "a\"\\\t😀.txt"}],
        //            key=lambda e: e["relpath"]), sort_keys=True)
        let entries = [entry("b/\u{fc} \u{e9}.png", &"0".repeat(32)), entry("a\"\\\t\u{1f600}.txt", &"f".repeat(32))];
        let expected = concat!(
            r#"[{"md5": "ffffffffffffffffffffffffffffffff", "relpath": "a\"\\\t\ud83d\ude00.txt"}, "#,
            r#"{"md5": "00000000000000000000000000000000", "relpath": "b/\u00fc \u00e9.png"}]"#
        );
        assert_eq!(String::from_utf8(manifest_bytes(&entries)).unwrap(), expected);
        assert_eq!(parse_manifest(expected.as_bytes()).unwrap(), {
            let mut e = entries.to_vec();
            e.sort();
            e.sort_by(|a, b| a.relpath.cmp(&b.relpath));
            e
        });
        assert_eq!(manifest_bytes(&[]), b"[]");
        // md5 of "[]" is d751713988987e9331980363e24189ce
        assert_eq!(dir_hash(&[]), "d751713988987e9331980363e24189ce.dir");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert!(parse_manifest(br#"[{"md5": "00000000000000000000000000000000", "relpath": "../x"}]"#).is_err());
        assert!(parse_manifest(br#"[{"md5": "zz", "relpath": "x"}]"#).is_err());
        assert!(parse_manifest(b"{}").is_err());
    }
}
