//! Matching a blend's styles to the styles of this studio, the one rule for the browser
//! (opening a share link on the Blend page) and the server (`atelier blend`,
//! `POST /api/blends/resolve`): a style is known by the A1111 short hash of its adapter, so
//! a shared blend renders with the very weights it was made with, whatever they are
//! called here.

use crate::BlendStyle;

/// What became of one style of a blend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StyleMatch {
    /// The local style at this index of the list given to [`match_styles`].
    Found(usize),
    /// No local style has the hash. `name_taken`: a local style has the blend style's
    /// name (so it holds other weights).
    Missing { name_taken: bool },
}

impl StyleMatch {
    /// The index of the local style, where found.
    pub fn found(self) -> Option<usize> {
        match self {
            StyleMatch::Found(i) => Some(i),
            StyleMatch::Missing { .. } => None,
        }
    }
}

/// Matches each style of a blend (same order) against the `local` styles, given as
/// (name, hash; `None` where the hash is unknown): the local style of the same name when
/// its hash is the blend style's, else the first local style with that hash, else missing.
pub fn match_styles(blend: &[BlendStyle], local: &[(&str, Option<&str>)]) -> Vec<StyleMatch> {
    blend
        .iter()
        .map(|s| {
            let same_name = local.iter().position(|(name, _)| *name == s.name);
            match same_name {
                Some(i) if local[i].1 == Some(s.hash.as_str()) => StyleMatch::Found(i),
                _ => match local.iter().position(|(_, hash)| *hash == Some(s.hash.as_str())) {
                    Some(i) => StyleMatch::Found(i),
                    None => StyleMatch::Missing { name_taken: same_name.is_some() },
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockWeights;

    fn style(name: &str, hash: &str) -> BlendStyle {
        BlendStyle { name: name.into(), hash: hash.into(), weight: 1.0, blocks: BlockWeights::default() }
    }

    #[test]
    fn same_name_and_hash_first_then_any_name_with_the_hash() {
        // "copy" has ink's bytes under another name, listed before it.
        let local = [("copy", Some("aaaa")), ("ink", Some("aaaa")), ("pastel", Some("bbbb")), ("mine", None)];
        let blend = [style("ink", "aaaa"), style("theirs", "bbbb"), style("other", "aaaa")];
        assert_eq!(match_styles(&blend, &local), [StyleMatch::Found(1), StyleMatch::Found(2), StyleMatch::Found(0)]);
    }

    #[test]
    fn missing_says_whether_the_name_is_taken() {
        let local = [("ink", Some("aaaa")), ("mine", None)];
        let blend = [style("ink", "ffff"), style("mine", "eeee"), style("new", "dddd")];
        assert_eq!(
            match_styles(&blend, &local),
            [StyleMatch::Missing { name_taken: true }, StyleMatch::Missing { name_taken: true }, StyleMatch::Missing { name_taken: false }]
        );
        assert_eq!(match_styles(&blend, &[]).iter().map(|m| m.found()).collect::<Vec<_>>(), [None, None, None]);
        // A same-name style whose hash is unknown does not stop a match by hash elsewhere.
        let local = [("ink", None), ("ink-copy", Some("aaaa"))];
        assert_eq!(match_styles(&[style("ink", "aaaa")], &local), [StyleMatch::Found(1)]);
    }
}
