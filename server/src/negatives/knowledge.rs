//! The curated knowledge base of negative prompts: categories, each with the cue words that
//! put a prompt in it and the negatives commonly used for it. The shipped one is
//! `knowledge.json` beside this file; a studio's edited copy lives in
//! `DATA/negatives/knowledge.json` (`PUT /api/negatives/knowledge`, or edit the file).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::NegativesError;

/// The shipped knowledge base.
pub const DEFAULT_JSON: &str = include_str!("knowledge.json");

/// What a category describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Image defects; suggested for every prompt (no cues needed).
    Quality,
    /// What the picture shows (its cue words are the prompt's subject).
    Subject,
    /// How it is rendered.
    Style,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub name: String,
    pub kind: Kind,
    /// Lower-case words or phrases that put a prompt in this category.
    #[serde(default)]
    pub cues: Vec<String>,
    pub negatives: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeBase {
    pub categories: Vec<Category>,
}

impl Default for KnowledgeBase {
    fn default() -> Self {
        serde_json::from_str(DEFAULT_JSON).expect("the shipped knowledge base parses")
    }
}

/// Most categories, and entries per list, a knowledge base may have.
const MAX_CATEGORIES: usize = 200;
const MAX_ENTRIES: usize = 200;

impl KnowledgeBase {
    /// Refuses empty names, duplicate names, empty negatives and oversized lists, saying which.
    pub fn check(&self) -> Result<(), String> {
        if self.categories.len() > MAX_CATEGORIES {
            return Err(format!("at most {MAX_CATEGORIES} categories, not {}", self.categories.len()));
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.categories {
            let name = c.name.trim();
            if name.is_empty() {
                return Err("a category has an empty name".into());
            }
            if !names.insert(name.to_lowercase()) {
                return Err(format!("the category {name:?} appears twice"));
            }
            if c.negatives.is_empty() {
                return Err(format!("the category {name:?} has no negatives"));
            }
            if c.kind != Kind::Quality && c.cues.is_empty() {
                return Err(format!("the category {name:?} needs cue words (only quality categories apply to every prompt)"));
            }
            if c.cues.len() > MAX_ENTRIES || c.negatives.len() > MAX_ENTRIES {
                return Err(format!("the category {name:?} has more than {MAX_ENTRIES} cues or negatives"));
            }
            if let Some(bad) = c.negatives.iter().chain(&c.cues).find(|s| s.trim().is_empty() || s.len() > 200) {
                return Err(format!("the category {name:?} has an empty or over-long entry ({bad:?})"));
            }
        }
        Ok(())
    }
}

/// The knowledge base file of a studio.
#[derive(Debug, Clone)]
pub struct KnowledgeFile {
    path: PathBuf,
}

impl KnowledgeFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The edited copy when there is one, else the shipped knowledge base. A copy that no
    /// longer parses is an error naming the file (it is never silently replaced).
    pub fn load(&self) -> Result<KnowledgeBase, NegativesError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let kb: KnowledgeBase = serde_json::from_str(&text)
                    .map_err(|error| NegativesError::UnreadableKnowledge { path: self.path.clone(), error })?;
                kb.check().map_err(|reason| NegativesError::InvalidKnowledgeFile { path: self.path.clone(), reason })?;
                Ok(kb)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KnowledgeBase::default()),
            Err(e) => Err(NegativesError::io("reading", &self.path)(e)),
        }
    }

    /// Checks and writes `kb` (atomically).
    pub fn save(&self, kb: &KnowledgeBase) -> Result<(), NegativesError> {
        kb.check().map_err(NegativesError::InvalidKnowledge)?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(NegativesError::io("creating", dir))?;
        }
        atelier_engine::files::write_json_atomic(&self.path, kb).map_err(NegativesError::io("writing", &self.path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_knowledge_base_is_valid() {
        let kb = KnowledgeBase::default();
        kb.check().unwrap();
        assert!(kb.categories.iter().any(|c| c.kind == Kind::Quality && c.negatives.contains(&"blurry".to_string())));
    }

    #[test]
    fn edits_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = KnowledgeFile::new(dir.path().join("negatives/knowledge.json"));
        assert_eq!(file.load().unwrap(), KnowledgeBase::default());
        let mut kb = KnowledgeBase::default();
        kb.categories[0].negatives.push("grainy".into());
        file.save(&kb).unwrap();
        assert_eq!(file.load().unwrap(), kb);
        let mut bad = kb.clone();
        bad.categories[2].cues.clear();
        let refused = file.save(&bad).unwrap_err();
        assert!(matches!(refused, NegativesError::InvalidKnowledge(_)), "{refused:?}");
        assert!(refused.to_string().contains("needs cue words"));
        let mut dup = kb.clone();
        dup.categories[1].name = dup.categories[0].name.to_uppercase();
        assert!(file.save(&dup).unwrap_err().to_string().contains("appears twice"));
        // A refused save leaves the file as it was; a hand-broken file is reported, not replaced.
        assert_eq!(file.load().unwrap(), kb);
        std::fs::write(file.path(), "{ not json").unwrap();
        let broken = file.load().unwrap_err();
        assert!(matches!(broken, NegativesError::UnreadableKnowledge { .. }), "{broken:?}");
        assert!(broken.to_string().contains("fix or delete it"));
        // A file that parses but breaks a rule names the file and the rule.
        std::fs::write(file.path(), serde_json::to_string(&dup).unwrap()).unwrap();
        let invalid = file.load().unwrap_err();
        assert!(matches!(invalid, NegativesError::InvalidKnowledgeFile { .. }), "{invalid:?}");
        assert!(invalid.to_string().contains("knowledge.json: ") && invalid.to_string().contains("appears twice"), "{invalid}");
    }
}
