//! Share links: a [`Blend`] as a short URL-safe string that reproduces it exactly and
//! detects any change.
//!
//! Layout (version 1), then base64url without padding:
//!
//! ```text
//! "AB" 0x01                          magic and version
//! hash   model_hash                  u8 length + bytes (hex digits decoded)
//! varint seed, steps, width, height
//! f64    guidance                    little-endian, exact
//! str    scheduler, prompt, negative varint length + UTF-8
//! varint n, then n × (str name, hash hash, f64 weight, u8 flags [, f64 down, mid, up if flags & 1])
//! 8 bytes                            first 8 bytes of SHA-256 of everything before
//! ```
//!
//! Weights are stored as f64 so a decoded blend renders the identical image; adapters and
//! the model are named by content hash, so the receiver can tell exactly what it lacks.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::{Blend, BlendStyle, BlockWeights};

const MAGIC: &[u8; 2] = b"AB";
const VERSION: u8 = 1;
const CHECKSUM: usize = 8;
/// Longest link text accepted (a blend of a few styles with a long prompt is ~300).
pub const MAX_LINK_CHARS: usize = 16 * 1024;
/// Most styles one link may carry.
pub const MAX_STYLES: usize = 64;

/// Why a link cannot be read. Every message says what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("the blend link is empty")]
    Empty,
    #[error("the blend link is too long ({0} characters; at most {MAX_LINK_CHARS})")]
    TooLong(usize),
    #[error("this is not a blend link (it has characters a link never has); copy the whole link again")]
    NotBase64,
    #[error("this is not an Atelier blend link")]
    BadMagic,
    #[error("this blend link was made by a newer Atelier (format {0}); update Atelier to open it")]
    UnsupportedVersion(u8),
    #[error("the blend link is damaged or cut off (its checksum does not match); copy the whole link again")]
    Checksum,
    #[error("the blend link is damaged: {0}")]
    Malformed(&'static str),
    #[error("cannot make a link: {0}")]
    Unencodable(String),
}

/// Encodes `blend` as link text.
pub fn encode(blend: &Blend) -> Result<String, LinkError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_hash(&mut out, &blend.model_hash)?;
    put_varint(&mut out, blend.seed);
    put_varint(&mut out, blend.steps as u64);
    put_varint(&mut out, blend.width as u64);
    put_varint(&mut out, blend.height as u64);
    out.extend_from_slice(&blend.guidance.to_le_bytes());
    put_str(&mut out, &blend.scheduler);
    put_str(&mut out, &blend.prompt);
    put_str(&mut out, &blend.negative_prompt);
    if blend.styles.len() > MAX_STYLES {
        return Err(LinkError::Unencodable(format!("at most {MAX_STYLES} styles")));
    }
    put_varint(&mut out, blend.styles.len() as u64);
    for s in &blend.styles {
        put_str(&mut out, &s.name);
        put_hash(&mut out, &s.hash)?;
        out.extend_from_slice(&s.weight.to_le_bytes());
        if s.blocks.is_neutral() {
            out.push(0);
        } else {
            out.push(1);
            for v in [s.blocks.down, s.blocks.mid, s.blocks.up] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum[..CHECKSUM]);
    let text = URL_SAFE_NO_PAD.encode(&out);
    if text.len() > MAX_LINK_CHARS {
        return Err(LinkError::Unencodable(format!("the link would be {} characters; shorten the prompt", text.len())));
    }
    Ok(text)
}

/// Decodes link text: the code alone, or a whole URL with `?b=CODE` (or `#CODE`).
pub fn decode(link: &str) -> Result<Blend, LinkError> {
    let code = code_of(link.trim());
    if code.is_empty() {
        return Err(LinkError::Empty);
    }
    if code.len() > MAX_LINK_CHARS {
        return Err(LinkError::TooLong(code.len()));
    }
    let code = code.trim_end_matches('=');
    if !code.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
        return Err(LinkError::NotBase64);
    }
    // Only a cut-off link has a length base64 cannot have.
    let bytes = URL_SAFE_NO_PAD.decode(code).map_err(|_| LinkError::Checksum)?;
    if bytes.len() < MAGIC.len() + 1 || &bytes[..2] != MAGIC {
        return Err(LinkError::BadMagic);
    }
    if bytes[2] != VERSION {
        return Err(LinkError::UnsupportedVersion(bytes[2]));
    }
    if bytes.len() < 3 + CHECKSUM {
        return Err(LinkError::Checksum);
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM);
    if Sha256::digest(body)[..CHECKSUM] != *sum {
        return Err(LinkError::Checksum);
    }
    let mut r = Reader { buf: &body[3..] };
    let model_hash = r.hash()?;
    let seed = r.varint()?;
    let steps = u32::try_from(r.varint()?).map_err(|_| LinkError::Malformed("steps out of range"))?;
    let width = u32::try_from(r.varint()?).map_err(|_| LinkError::Malformed("width out of range"))?;
    let height = u32::try_from(r.varint()?).map_err(|_| LinkError::Malformed("height out of range"))?;
    let guidance = r.f64()?;
    let scheduler = r.string()?;
    let prompt = r.string()?;
    let negative_prompt = r.string()?;
    let n = r.varint()? as usize;
    if n > MAX_STYLES {
        return Err(LinkError::Malformed("too many styles"));
    }
    let mut styles = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.string()?;
        let hash = r.hash()?;
        let weight = r.f64()?;
        let blocks = match r.byte()? {
            0 => BlockWeights::default(),
            1 => BlockWeights { down: r.f64()?, mid: r.f64()?, up: r.f64()? },
            _ => return Err(LinkError::Malformed("unknown style flags")),
        };
        if !weight.is_finite() || ![blocks.down, blocks.mid, blocks.up].iter().all(|v| v.is_finite()) {
            return Err(LinkError::Malformed("a weight is not a number"));
        }
        styles.push(BlendStyle { name, hash, weight, blocks });
    }
    if !r.buf.is_empty() {
        return Err(LinkError::Malformed("extra bytes at the end"));
    }
    if !guidance.is_finite() {
        return Err(LinkError::Malformed("guidance is not a number"));
    }
    Ok(Blend { model_hash, styles, prompt, negative_prompt, seed, steps, guidance, scheduler, width, height })
}

/// The code inside a pasted link: after `b=` (up to `&` or `#`), after `#`, or all of it.
fn code_of(link: &str) -> &str {
    if let Some(i) = link.find("?b=").or_else(|| link.find("&b=")) {
        let rest = &link[i + 3..];
        return &rest[..rest.find(['&', '#']).unwrap_or(rest.len())];
    }
    match link.rfind('#') {
        // An empty fragment is no code: judge the whole text instead.
        Some(i) if i + 1 < link.len() => &link[i + 1..],
        _ => link,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Hashes are hex strings; stored as their bytes.
fn put_hash(out: &mut Vec<u8>, hex: &str) -> Result<(), LinkError> {
    let bad = || LinkError::Unencodable(format!("{hex:?} is not a hex hash of at most 64 digits"));
    if hex.len() % 2 != 0 || hex.len() > 64 {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<_, _>>().map_err(|_| bad())?;
    out.push(bytes.len() as u8);
    out.extend_from_slice(&bytes);
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], LinkError> {
        if self.buf.len() < n {
            return Err(LinkError::Malformed("it ends too early"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, LinkError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(LinkError::Malformed("a number is too long"))
    }

    fn f64(&mut self) -> Result<f64, LinkError> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn string(&mut self) -> Result<String, LinkError> {
        let n = self.varint()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| LinkError::Malformed("text is not UTF-8"))
    }

    fn hash(&mut self) -> Result<String, LinkError> {
        let n = self.byte()? as usize;
        if n > 32 {
            return Err(LinkError::Malformed("a hash is too long"));
        }
        Ok(self.take(n)?.iter().map(|b| format!("{b:02x}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Blend {
        Blend {
            model_hash: "4f2a1c9e07".into(),
            styles: vec![
                BlendStyle { name: "inkline".into(), hash: "0a1b2c3d4e".into(), weight: 0.1 + 0.2, blocks: BlockWeights::default() },
                BlendStyle { name: "pastel".into(), hash: "ffeeddccbb".into(), weight: -0.35, blocks: BlockWeights { down: 0.0, mid: 0.5, up: 1.25 } },
            ],
            prompt: "a red circle on a blue background, ünïcode ✓".into(),
            negative_prompt: "blurry".into(),
            seed: u64::MAX - 3,
            steps: 20,
            guidance: 7.5,
            scheduler: "dpmpp-2m-karras".into(),
            width: 64,
            height: 64,
        }
    }

    #[test]
    fn round_trips_exactly_and_compactly() {
        let b = sample();
        let link = encode(&b).unwrap();
        assert!(link.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{link}");
        assert!(link.len() < 300, "{} chars", link.len());
        assert_eq!(decode(&link).unwrap(), b);
        assert_eq!(decode(&format!("http://studio.local:3000/blend?b={link}&x=1")).unwrap(), b);
        assert_eq!(decode(&format!("  /blend#{link}\n")).unwrap(), b);
        // Empty blend and empty strings too.
        let empty = Blend { styles: vec![], prompt: String::new(), negative_prompt: String::new(), model_hash: String::new(), ..b };
        assert_eq!(decode(&encode(&empty).unwrap()).unwrap(), empty);
    }

    #[test]
    fn every_truncation_and_every_flipped_bit_is_refused() {
        let link = encode(&sample()).unwrap();
        for cut in 1..link.len() {
            let e = decode(&link[..cut]).unwrap_err();
            assert!(matches!(e, LinkError::Checksum | LinkError::BadMagic), "cut at {cut}: {e}");
        }
        let bytes = URL_SAFE_NO_PAD.decode(&link).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let e = decode(&URL_SAFE_NO_PAD.encode(&b)).unwrap_err();
                assert!(matches!(e, LinkError::Checksum | LinkError::BadMagic | LinkError::UnsupportedVersion(_)), "byte {i} bit {bit}: {e}");
            }
        }
    }

    #[test]
    fn malformed_inputs_get_errors_not_panics() {
        let cases = ["", "   ", "!!!!", "AB", "QUIB", "https://x/blend?b=", &"A".repeat(MAX_LINK_CHARS + 1)];
        for c in cases {
            assert!(decode(c).is_err(), "{c:?}");
        }
        assert_eq!(decode("QUIC").unwrap_err(), LinkError::UnsupportedVersion(2));
        // Text that is no link at all is called that, not "empty" (a trailing `#` is no fragment).
        assert_eq!(decode("!!!@@@###").unwrap_err(), LinkError::NotBase64);
        assert_eq!(decode("https://x/blend#").unwrap_err(), LinkError::NotBase64);
        // Well-checksummed garbage after the header: a clean error.
        let mut seed = 0x9e3779b97f4a7c15u64;
        for len in 0..200 {
            let mut body = b"AB\x01".to_vec();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.push(seed as u8);
            }
            let sum = Sha256::digest(&body);
            body.extend_from_slice(&sum[..CHECKSUM]);
            let _ = decode(&URL_SAFE_NO_PAD.encode(&body)); // must not panic
        }
        // Hashes must be hex to be encoded.
        let mut b = sample();
        b.styles[0].hash = "not-hex".into();
        assert!(matches!(encode(&b), Err(LinkError::Unencodable(_))));
    }
}
