//! What earlier optimisations measured: for every candidate negative prompt tried, the prompt
//! it was tried on and how much it changed the combined quality score against that run's
//! baseline. Suggestions for a new prompt rank negatives by this evidence from similar
//! prompts (`DATA/negatives/history.json`).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::NegativesError;

/// One measured candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub prompt: String,
    pub negative: String,
    /// Mean change of the combined score against the baseline, over `seeds` seeds.
    pub delta: f64,
    pub seeds: usize,
    /// The optimisation run it came from.
    pub run: String,
}

/// Evidence about one negative for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub negative: String,
    /// Similarity-weighted mean delta of the entries that count.
    pub mean_delta: f64,
    /// How many entries count (similar enough prompts).
    pub entries: usize,
    /// The highest prompt similarity among them.
    pub similarity: f64,
}

/// Prompts count as similar from this word-set Jaccard similarity on.
pub const MIN_SIMILARITY: f64 = 0.25;

/// The history file; reads and writes go through one lock.
pub struct History {
    path: PathBuf,
    lock: Mutex<()>,
}

impl History {
    pub fn new(path: PathBuf) -> Self {
        Self { path, lock: Mutex::new(()) }
    }

    /// Every entry (none when the file does not exist yet).
    pub fn entries(&self) -> Result<Vec<Entry>, NegativesError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.read()
    }

    fn read(&self) -> Result<Vec<Entry>, NegativesError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| NegativesError::DamagedHistory { path: self.path.clone(), error }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(NegativesError::io("reading", &self.path)(e)),
        }
    }

    /// Appends `entries` (atomically rewriting the file).
    pub fn record(&self, entries: &[Entry]) -> Result<(), NegativesError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.read()?;
        all.extend_from_slice(entries);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(NegativesError::io("creating", dir))?;
        }
        atelier_engine::files::write_json_atomic(&self.path, &all).map_err(NegativesError::io("writing", &self.path))?;
        Ok(())
    }
}

/// A prompt's text without attention syntax (`(word:1.2)` and `[word]` become `word`).
pub fn plain_text(text: &str) -> String {
    atelier_engine::prompt::parse_attention(text).into_iter().map(|(t, _)| t).collect::<Vec<_>>().join(" ")
}

/// The words of a prompt in order: lower case, letters and digits, attention syntax removed.
pub fn words(text: &str) -> Vec<String> {
    plain_text(text).to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// The content words of a prompt: its [`words`] without extra-network tags (`<lora:…>`,
/// `<lyco:…>`, `<hypernet:…>`, …), A1111's `BREAK` and filler words.
pub fn content_words(prompt: &str) -> BTreeSet<String> {
    const FILLER: [&str; 16] = ["a", "an", "the", "on", "in", "of", "with", "and", "at", "to", "by", "for", "is", "very", "style", "background"];
    let text = atelier_engine::prompt::parse_extra_networks(prompt).map(|n| n.text).unwrap_or_else(|_| prompt.to_string());
    let text = text.split_whitespace().filter(|w| *w != "BREAK").collect::<Vec<_>>().join(" ");
    words(&text).into_iter().filter(|w| !FILLER.contains(&w.as_str())).collect()
}

/// Jaccard similarity of two prompts' content words (1 for two prompts with none).
pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b) = (content_words(a), content_words(b));
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

/// Canonical form of a negative prompt for comparing entries: trimmed, lower case, single spaces.
pub fn canonical(negative: &str) -> String {
    negative.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Evidence for every negative tried on a prompt similar to `prompt`, best first.
pub fn evidence(entries: &[Entry], prompt: &str) -> Vec<Evidence> {
    let mut by_negative: HashMap<String, (f64, f64, usize, f64)> = HashMap::new();
    for e in entries {
        let s = similarity(prompt, &e.prompt);
        if s < MIN_SIMILARITY {
            continue;
        }
        let slot = by_negative.entry(canonical(&e.negative)).or_default();
        slot.0 += s * e.delta;
        slot.1 += s;
        slot.2 += 1;
        slot.3 = slot.3.max(s);
    }
    let mut out: Vec<Evidence> = by_negative
        .into_iter()
        .map(|(negative, (sum, weight, entries, similarity))| Evidence { negative, mean_delta: sum / weight, entries, similarity })
        .collect();
    out.sort_by(|a, b| b.mean_delta.total_cmp(&a.mean_delta).then_with(|| a.negative.cmp(&b.negative)));
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A history entry measured on 4 seeds (shared with the analysis tests).
    pub(in crate::negatives) fn entry(prompt: &str, negative: &str, delta: f64) -> Entry {
        Entry { prompt: prompt.into(), negative: negative.into(), delta, seeds: 4, run: "r".into() }
    }

    #[test]
    fn content_words_ignore_syntax_and_filler() {
        let w = content_words("a (red:1.2) circle on a [blue] background, <lora:inkline:0.7> inkline style");
        assert_eq!(w.into_iter().collect::<Vec<_>>(), ["blue", "circle", "inkline", "red"]);
        // Every extra-network tag and A1111's BREAK are syntax, not words.
        let w = content_words("a red circle BREAK <lyco:pastel:0.8> <hypernet:foo:1> on blue");
        assert_eq!(w.into_iter().collect::<Vec<_>>(), ["blue", "circle", "red"]);
        assert!((similarity("a red circle", "a red square") - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn evidence_weights_by_similarity_and_ignores_unrelated_prompts() {
        let entries = [
            entry("a red circle on a blue background", "blurry", 0.04),
            entry("a red circle on a green background", "blurry", 0.01),
            entry("a red circle on a blue background", "Watermark", -0.02),
            entry("portrait of an old fisherman", "noisy", 0.5),
        ];
        let ev = evidence(&entries, "a red circle on a blue background");
        assert_eq!(ev.iter().map(|e| e.negative.as_str()).collect::<Vec<_>>(), ["blurry", "watermark"]);
        // Similarities 1 and 0.5: (1·0.04 + 0.5·0.01) / 1.5.
        assert!((ev[0].mean_delta - 0.045 / 1.5).abs() < 1e-12);
        assert_eq!((ev[0].entries, ev[0].similarity), (2, 1.0));
        assert!(evidence(&entries, "a castle at night").is_empty());
    }

    #[test]
    fn records_append_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().join("negatives/history.json"));
        assert!(h.entries().unwrap().is_empty());
        h.record(&[entry("a", "b", 0.1)]).unwrap();
        h.record(&[entry("c", "d", -0.1)]).unwrap();
        assert_eq!(h.entries().unwrap().len(), 2);
        assert_eq!(std::fs::read_dir(dir.path().join("negatives")).unwrap().count(), 1, "no temp files left");
        std::fs::write(dir.path().join("negatives/history.json"), "[{").unwrap();
        let damaged = h.entries().unwrap_err();
        assert!(matches!(damaged, NegativesError::DamagedHistory { .. }), "{damaged:?}");
        assert!(damaged.to_string().contains("history.json is damaged ("), "{damaged}");
    }
}
