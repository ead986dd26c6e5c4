//! Prompt analysis: the subject and style cues of a prompt (A1111 syntax understood), the
//! negatives to suggest for it, and contradictions between the prompt and its negative.

use std::collections::BTreeSet;

use app::dto::{Contradiction, NegativeAnalysis, Suggestion, SuggestionEvidence};

use super::history::{canonical, content_words, evidence, plain_text, words, Entry};
use super::knowledge::{KnowledgeBase, Kind};

/// The comma-separated phrases of a negative prompt, canonical, without empty ones.
pub fn phrases(negative: &str) -> Vec<String> {
    plain_text(negative).split(',').map(canonical).filter(|p| !p.is_empty()).collect()
}

/// Whether the lower-case `text` contains the cue (a word or phrase) as whole words.
fn has_cue(words: &[String], cue: &str) -> bool {
    let cue: Vec<&str> = cue.split_whitespace().collect();
    !cue.is_empty() && words.windows(cue.len()).any(|w| w.iter().map(String::as_str).eq(cue.iter().copied()))
}

/// Analyses `prompt` with its current `negative`, against the knowledge base and the history.
pub fn analyze(prompt: &str, negative: &str, kb: &KnowledgeBase, history: &[Entry]) -> NegativeAnalysis {
    let (text, tags) = atelier_engine::prompt::extract_lora_tags(prompt).unwrap_or_else(|_| (prompt.to_string(), Vec::new()));
    let words = words(&text);
    let mut subject = Vec::new();
    let mut style_cues: Vec<String> = tags.iter().map(|t| t.name.clone()).collect();
    let mut categories = Vec::new();
    for c in &kb.categories {
        let found: Vec<&String> = c.cues.iter().filter(|cue| has_cue(&words, &cue.to_lowercase())).collect();
        if c.kind == Kind::Quality || !found.is_empty() {
            categories.push(c.name.clone());
        }
        let into = if c.kind == Kind::Style { &mut style_cues } else { &mut subject };
        for f in found {
            if !into.contains(f) {
                into.push(f.clone());
            }
        }
    }

    let prompt_words = content_words(&text);
    let already: BTreeSet<String> = phrases(negative).into_iter().collect();
    let conflicts = |candidate: &str| !content_words(candidate).is_disjoint(&prompt_words);

    let mut suggestions: Vec<Suggestion> = Vec::new();
    let mut seen: BTreeSet<String> = already.clone();
    let past = evidence(history, &text);
    // Measured help first.
    for e in past.iter().filter(|e| e.mean_delta > 0.0) {
        if conflicts(&e.negative) || !seen.insert(e.negative.clone()) {
            continue;
        }
        suggestions.push(Suggestion {
            negative: e.negative.clone(),
            category: "history".into(),
            reason: format!(
                "raised the quality score by {:+.3} on {} similar prompt{}",
                e.mean_delta,
                e.entries,
                if e.entries == 1 { "" } else { "s" }
            ),
            evidence: Some(SuggestionEvidence { mean_delta: e.mean_delta, runs: e.entries, similarity: e.similarity }),
        });
    }
    // Then the knowledge base, subject and style categories before general quality ones;
    // negatives that measurably hurt similar prompts go last.
    let mut kb_items: Vec<(usize, Suggestion)> = Vec::new();
    for c in kb.categories.iter().filter(|c| categories.contains(&c.name)) {
        let rank = if c.kind == Kind::Quality { 1 } else { 0 };
        for n in &c.negatives {
            let key = canonical(n);
            if conflicts(&key) || !seen.insert(key.clone()) {
                continue;
            }
            let hurt = past.iter().find(|e| e.negative == key && e.mean_delta <= 0.0);
            let reason = match (hurt, c.kind) {
                (Some(e), _) => format!("common for {} prompts, but changed the score by {:+.3} on similar prompts", c.name, e.mean_delta),
                (None, Kind::Quality) => format!("a common {} negative", c.name),
                (None, _) => format!("common for {} prompts", c.name),
            };
            let evidence = hurt.map(|e| SuggestionEvidence { mean_delta: e.mean_delta, runs: e.entries, similarity: e.similarity });
            kb_items.push((if hurt.is_some() { 2 } else { rank }, Suggestion { negative: key, category: c.name.clone(), reason, evidence }));
        }
    }
    kb_items.sort_by_key(|(rank, _)| *rank);
    suggestions.extend(kb_items.into_iter().map(|(_, s)| s));

    NegativeAnalysis { subject: subject.clone(), style_cues, categories, suggestions, contradictions: contradictions(&text, negative, &subject) }
}

/// Words in both prompts, and negatives that name the prompt's subject.
pub fn contradictions(prompt: &str, negative: &str, subject: &[String]) -> Vec<Contradiction> {
    let prompt_words = content_words(prompt);
    let mut out = Vec::new();
    for phrase in phrases(negative) {
        for word in content_words(&phrase).intersection(&prompt_words) {
            if out.iter().any(|c: &Contradiction| &c.word == word) {
                continue;
            }
            let (kind, message) = if subject.iter().any(|s| s.split_whitespace().any(|w| w == word)) {
                (
                    "subject",
                    format!("“{word}” is the subject of the prompt, and the negative “{phrase}” steers away from it: the image may lose its subject. Remove it from the negative prompt."),
                )
            } else {
                (
                    "both",
                    format!("“{word}” is in the prompt and in the negative “{phrase}”: the two pull against each other and mostly cancel. Keep it in one of them."),
                )
            };
            out.push(Contradiction { word: word.clone(), kind: kind.into(), message });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::negatives::history::tests::entry;

    #[test]
    fn finds_subject_style_and_categories() {
        let a = analyze("a (red:1.3) circle on a blue background, <lora:inkline:0.8> ink style", "", &KnowledgeBase::default(), &[]);
        assert_eq!(a.subject, ["circle"]);
        assert_eq!(a.style_cues, ["inkline", "ink", "style"]);
        assert!(a.categories.contains(&"shapes".to_string()) && a.categories.contains(&"image quality".to_string()));
        assert!(!a.categories.contains(&"portrait".to_string()));
        // Subject and style suggestions come before the general quality ones.
        assert_eq!(a.suggestions[0].category, "shapes");
        assert!(a.suggestions.iter().any(|s| s.negative == "blurry" && s.category == "image quality"));
        assert!(a.contradictions.is_empty());
    }

    #[test]
    fn history_ranks_measured_help_first_and_measured_harm_last() {
        let history = [
            entry("a red circle on a blue background", "noisy", 0.03),
            entry("a red circle on a green background", "blurry", -0.01),
            entry("a castle at night", "lowres", 0.9),
        ];
        let a = analyze("a red circle on a blue background", "", &KnowledgeBase::default(), &history);
        assert_eq!(a.suggestions[0].negative, "noisy");
        assert_eq!(a.suggestions[0].category, "history");
        assert!(a.suggestions[0].reason.contains("+0.030"), "{}", a.suggestions[0].reason);
        let last = a.suggestions.last().unwrap();
        assert_eq!(last.negative, "blurry");
        assert!(last.evidence.as_ref().unwrap().mean_delta < 0.0);
        // Unrelated prompts' evidence does not count.
        assert!(!a.suggestions.iter().any(|s| s.negative == "lowres" && s.category == "history"));
    }

    #[test]
    fn contradictions_are_explained() {
        let a = analyze("a red circle on a blue background", "blue, circle outline, blurry", &KnowledgeBase::default(), &[]);
        let kinds: Vec<(&str, &str)> = a.contradictions.iter().map(|c| (c.word.as_str(), c.kind.as_str())).collect();
        assert_eq!(kinds, [("blue", "both"), ("circle", "subject")]);
        assert!(a.contradictions[1].message.contains("lose its subject"));
        // Negatives already used, and ones that would contradict the prompt, are not suggested.
        assert!(!a.suggestions.iter().any(|s| s.negative == "blurry"));
        let b = analyze("a small red circle", "", &KnowledgeBase::default(), &[]);
        assert!(!b.suggestions.iter().any(|s| s.negative == "small"));
    }
}
