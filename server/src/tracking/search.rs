//! MLflow's run filter language (`mlflow.search_runs(filter_string=…)`, the runs table of
//! the MLflow UI), over the embedded store: clauses joined by `and`, each
//! `ENTITY.KEY OP VALUE`:
//!
//! - `metrics.KEY` compared with a number by `=`, `!=`, `>`, `>=`, `<`, `<=` (the run's
//!   latest value of the metric);
//! - `params.KEY`, `tags.KEY` compared with a quoted string by `=`, `!=`, `LIKE`, `ILIKE`
//!   (`%` any run of characters, `_` one character; `ILIKE` ignores case);
//! - `attributes.status`, `attributes.run_name`, `attributes.run_id` like tags;
//!   `attributes.start_time`, `attributes.end_time` (ms since the epoch) like metrics.
//!
//! Keys with other characters are quoted in backticks or double quotes
//! (``metrics.`similarity gain` > 0``); `metric`, `param`, `tag`, `attribute`, `attr` and
//! `run` are accepted for the prefixes, as MLflow does. A run that lacks the metric, param
//! or tag a clause names does not match it. Errors name the character where the problem is.

use std::collections::BTreeMap;

/// A filter that could not be read: `position` is the 0-based character where it fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid filter at character {}: {message}", .position + 1)]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

/// What a clause looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Entity {
    Metric,
    Param,
    Tag,
    Attribute,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Like,
    ILike,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Text(String),
}

/// One `ENTITY.KEY OP VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub entity: Entity,
    pub key: String,
    pub op: Op,
    pub value: Value,
}

/// A parsed filter: every clause must hold. The empty filter matches every run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub clauses: Vec<Clause>,
}

/// What a filter is matched against: a run with its params, tags and latest metrics.
pub struct RunFacts<'a> {
    pub run_id: &'a str,
    pub run_name: &'a str,
    pub status: &'a str,
    pub start_time: i64,
    pub end_time: Option<i64>,
    pub params: &'a BTreeMap<String, String>,
    pub tags: &'a BTreeMap<String, String>,
    pub metrics: &'a BTreeMap<String, f64>,
}

/// What `filter` is matched against for `run`.
pub fn facts(run: &app::dto::RunSummary) -> RunFacts<'_> {
    RunFacts {
        run_id: &run.info.run_id,
        run_name: &run.info.name,
        status: &run.info.status,
        start_time: run.info.start_time,
        end_time: run.info.end_time,
        params: &run.params,
        tags: &run.tags,
        metrics: &run.metrics,
    }
}

const NUMERIC_ATTRIBUTES: [&str; 2] = ["start_time", "end_time"];
const TEXT_ATTRIBUTES: [&str; 3] = ["status", "run_name", "run_id"];

struct Reader<'a> {
    chars: Vec<char>,
    pos: usize,
    _text: &'a str,
}

impl Reader<'_> {
    fn err<T>(&self, at: usize, message: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError { position: at, message: message.into() })
    }

    fn skip_space(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_space();
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// A word of letters, digits and `_`.
    fn word(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// A quoted string (`'…'`, `"…"` or `` `…` ``); a doubled quote stands for itself.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let start = self.pos;
        let quote = self.chars[self.pos];
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return self.err(start, format!("this {quote} is never closed")),
                Some(c) if c == quote => {
                    if self.chars.get(self.pos + 1) == Some(&quote) {
                        out.push(quote);
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                        return Ok(out);
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn identifier(&mut self) -> Result<(Entity, String), FilterError> {
        self.skip_space();
        let start = self.pos;
        let prefix = self.word();
        if prefix.is_empty() {
            return self.err(start, "expected metrics.KEY, params.KEY, tags.KEY or attributes.NAME");
        }
        let entity = match prefix.to_ascii_lowercase().as_str() {
            "metrics" | "metric" => Entity::Metric,
            "params" | "param" | "parameters" | "parameter" => Entity::Param,
            "tags" | "tag" => Entity::Tag,
            "attributes" | "attribute" | "attr" | "run" => Entity::Attribute,
            _ => return self.err(start, format!("{prefix:?} is not metrics, params, tags or attributes")),
        };
        if self.peek() != Some('.') {
            return self.err(self.pos, format!("expected a . and a key after {prefix}"));
        }
        self.pos += 1;
        let key_at = self.pos;
        let key = match self.peek() {
            Some('`' | '"') => self.quoted()?,
            _ => {
                while self.peek().is_some_and(|c| c.is_alphanumeric() || "_.-/:".contains(c)) {
                    self.pos += 1;
                }
                self.chars[key_at..self.pos].iter().collect()
            }
        };
        if key.is_empty() {
            return self.err(key_at, format!("expected a key after {prefix}. (quote it in backticks if it has spaces)"));
        }
        if entity == Entity::Attribute && !NUMERIC_ATTRIBUTES.contains(&key.as_str()) && !TEXT_ATTRIBUTES.contains(&key.as_str()) {
            return self.err(key_at, format!("no attribute {key:?}; use status, run_name, run_id, start_time or end_time"));
        }
        Ok((entity, key))
    }

    fn op(&mut self) -> Result<Op, FilterError> {
        self.skip_space();
        let at = self.pos;
        let two: String = self.chars[self.pos..(self.pos + 2).min(self.chars.len())].iter().collect();
        let symbolic = [("!=", Op::Ne), (">=", Op::Ge), ("<=", Op::Le), ("=", Op::Eq), (">", Op::Gt), ("<", Op::Lt)];
        for (text, op) in symbolic {
            if two.starts_with(text) {
                self.pos += text.len();
                return Ok(op);
            }
        }
        let word = self.word();
        match word.to_ascii_uppercase().as_str() {
            "LIKE" => Ok(Op::Like),
            "ILIKE" => Ok(Op::ILike),
            "" => self.err(at, "expected a comparison: =, !=, >, >=, <, <=, LIKE or ILIKE"),
            other => self.err(at, format!("{other} is not a comparison; use =, !=, >, >=, <, <=, LIKE or ILIKE")),
        }
    }

    fn value(&mut self) -> Result<(Value, usize), FilterError> {
        self.skip_space();
        let at = self.pos;
        match self.peek() {
            Some('\'' | '"') => Ok((Value::Text(self.quoted()?), at)),
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => {
                while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
                    self.pos += 1;
                }
                let text: String = self.chars[at..self.pos].iter().collect();
                match text.parse::<f64>() {
                    Ok(v) => Ok((Value::Number(v), at)),
                    Err(_) => self.err(at, format!("{text:?} is not a number")),
                }
            }
            None => self.err(at, "expected a value (a number, or text in quotes)"),
            Some(_) => {
                let word = self.word();
                self.err(at, format!("expected a number or quoted text, not {word:?} (put text in 'single quotes')"))
            }
        }
    }
}

/// Reads `text` (see the module documentation).
pub fn parse(text: &str) -> Result<Filter, FilterError> {
    let mut r = Reader { chars: text.chars().collect(), pos: 0, _text: text };
    let mut clauses = Vec::new();
    if r.at_end() {
        return Ok(Filter { clauses });
    }
    loop {
        let ident_at = {
            r.skip_space();
            r.pos
        };
        let (entity, key) = r.identifier()?;
        let op_at = {
            r.skip_space();
            r.pos
        };
        let op = r.op()?;
        let (value, value_at) = r.value()?;
        let numeric_side = entity == Entity::Metric || (entity == Entity::Attribute && NUMERIC_ATTRIBUTES.contains(&key.as_str()));
        match (&value, numeric_side, op) {
            (Value::Number(_), true, Op::Like | Op::ILike) => return r.err(op_at, "LIKE and ILIKE compare text; metrics and times take =, !=, >, >=, <, <="),
            (Value::Text(_), true, _) => return r.err(value_at, format!("{key} is a number: compare it with a number, without quotes")),
            (Value::Number(_), false, _) => return r.err(value_at, format!("{key} is text: put the value in 'single quotes'")),
            (Value::Text(_), false, Op::Gt | Op::Ge | Op::Lt | Op::Le) => {
                return r.err(op_at, "text is compared with =, !=, LIKE or ILIKE")
            }
            _ => {}
        }
        let _ = ident_at;
        clauses.push(Clause { entity, key, op, value });
        if r.at_end() {
            return Ok(Filter { clauses });
        }
        let and_at = r.pos;
        let word = r.word();
        if !word.eq_ignore_ascii_case("and") {
            let shown = if word.is_empty() { r.peek().map(String::from).unwrap_or_default() } else { word };
            return if shown.eq_ignore_ascii_case("or") {
                r.err(and_at, "OR is not supported (MLflow filters join clauses with AND only)")
            } else {
                r.err(and_at, format!("expected AND between clauses, not {shown:?}"))
            };
        }
        if r.at_end() {
            return r.err(r.pos, "expected a clause after AND");
        }
    }
}

/// SQL `LIKE`: `%` any run of characters, `_` one character.
fn like(text: &str, pattern: &str, ignore_case: bool) -> bool {
    let fold = |s: &str| if ignore_case { s.to_lowercase().chars().collect::<Vec<_>>() } else { s.chars().collect() };
    let (t, p) = (fold(text), fold(pattern));
    // matched[j]: the first i characters of the text match the first j of the pattern.
    let mut matched = vec![false; p.len() + 1];
    matched[0] = true;
    for j in 1..=p.len() {
        matched[j] = matched[j - 1] && p[j - 1] == '%';
    }
    for &c in &t {
        let mut next = vec![false; p.len() + 1];
        for j in 1..=p.len() {
            next[j] = match p[j - 1] {
                '%' => next[j - 1] || matched[j],
                '_' => matched[j - 1],
                pc => matched[j - 1] && pc == c,
            };
        }
        matched = next;
    }
    matched[p.len()]
}

impl Clause {
    fn holds(&self, run: &RunFacts<'_>) -> bool {
        let number = match (&self.entity, self.key.as_str()) {
            (Entity::Metric, key) => run.metrics.get(key).copied(),
            (Entity::Attribute, "start_time") => Some(run.start_time as f64),
            (Entity::Attribute, "end_time") => run.end_time.map(|t| t as f64),
            _ => None,
        };
        if let (Some(x), Value::Number(v)) = (number, &self.value) {
            return match self.op {
                Op::Eq => x == *v,
                Op::Ne => x != *v,
                Op::Gt => x > *v,
                Op::Ge => x >= *v,
                Op::Lt => x < *v,
                Op::Le => x <= *v,
                Op::Like | Op::ILike => false,
            };
        }
        let text = match (&self.entity, self.key.as_str()) {
            (Entity::Param, key) => run.params.get(key).map(String::as_str),
            (Entity::Tag, key) => run.tags.get(key).map(String::as_str),
            (Entity::Attribute, "status") => Some(run.status),
            (Entity::Attribute, "run_name") => Some(run.run_name),
            (Entity::Attribute, "run_id") => Some(run.run_id),
            _ => None,
        };
        match (text, &self.value) {
            (Some(t), Value::Text(v)) => match self.op {
                Op::Eq => t == v,
                Op::Ne => t != v,
                Op::Like => like(t, v, false),
                Op::ILike => like(t, v, true),
                _ => false,
            },
            _ => false,
        }
    }
}

impl Filter {
    /// Whether every clause holds for `run`.
    pub fn matches(&self, run: &RunFacts<'_>) -> bool {
        self.clauses.iter().all(|c| c.holds(run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(params: &'a BTreeMap<String, String>, tags: &'a BTreeMap<String, String>, metrics: &'a BTreeMap<String, f64>) -> RunFacts<'a> {
        RunFacts { run_id: "abc123", run_name: "ink-r8", status: "FINISHED", start_time: 1_000, end_time: Some(5_000), params, tags, metrics }
    }

    fn map<V: Clone>(pairs: &[(&str, V)]) -> BTreeMap<String, V> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn the_issue_filter_parses_and_selects() {
        let f = parse("metrics.similarity_gain > 0.05 and params.rank = '8'").unwrap();
        assert_eq!(f.clauses.len(), 2);
        assert_eq!(f.clauses[0], Clause { entity: Entity::Metric, key: "similarity_gain".into(), op: Op::Gt, value: Value::Number(0.05) });
        let (p8, p4) = (map(&[("rank", "8".to_string())]), map(&[("rank", "4".to_string())]));
        let tags = map::<String>(&[]);
        let (good, weak) = (map(&[("similarity_gain", 0.2)]), map(&[("similarity_gain", 0.01)]));
        assert!(f.matches(&facts(&p8, &tags, &good)));
        assert!(!f.matches(&facts(&p8, &tags, &weak)));
        assert!(!f.matches(&facts(&p4, &tags, &good)));
        assert!(!f.matches(&facts(&map(&[]), &tags, &good)), "a run without the param does not match");
        assert!(parse("").unwrap().matches(&facts(&p4, &tags, &weak)), "the empty filter matches all");
    }

    #[test]
    fn prefixes_quotes_attributes_and_like() {
        let params = map(&[("model name", "starter v2".to_string())]);
        let tags = map(&[("mlflow.runName", "Ink Line".to_string())]);
        let metrics = map(&[("loss", 0.5)]);
        let run = facts(&params, &tags, &metrics);
        for (filter, expected) in [
            ("metric.loss <= 0.5 AND param.`model name` = 'starter v2'", true),
            ("params.\"model name\" LIKE 'starter%'", true),
            ("tags.mlflow.runName LIKE 'ink%'", false),
            ("tags.mlflow.runName ILIKE 'ink_line'", true),
            ("attributes.status = 'FINISHED' and attributes.start_time < 2000", true),
            ("attr.run_name != 'ink-r8'", false),
            ("run.end_time >= 5000 and metrics.loss != 0.5", false),
            ("params.`model name` = 'it''s'", false),
        ] {
            assert_eq!(parse(filter).unwrap().matches(&run), expected, "{filter}");
        }
        assert_eq!(parse("params.x = 'it''s'").unwrap().clauses[0].value, Value::Text("it's".into()));
    }

    #[test]
    fn errors_name_the_character() {
        for (filter, position, needle) in [
            ("metrics.loss >", 14, "expected a value"),
            ("metrics.loss > 'x'", 15, "is a number"),
            ("params.rank = 8", 14, "single quotes"),
            ("params.rank > '8'", 12, "=, !=, LIKE or ILIKE"),
            ("metric.loss < 1 or params.a = 'b'", 16, "OR is not supported"),
            ("metrics.loss < 1 params.a = 'b'", 17, "expected AND"),
            ("metrics.loss < 1 and", 20, "after AND"),
            ("foo.bar = 1", 0, "not metrics, params, tags or attributes"),
            ("metrics = 1", 7, "expected a . and a key"),
            ("attributes.colour = 'red'", 11, "no attribute"),
            ("params.a = 'open", 11, "never closed"),
            ("metrics.loss ~ 1", 13, "expected a comparison"),
            ("metrics.loss < 1e", 15, "not a number"),
        ] {
            let e = parse(filter).unwrap_err();
            assert_eq!(e.position, position, "{filter}: {e}");
            assert!(e.message.contains(needle), "{filter}: {e}");
        }
        assert_eq!(parse("metrics.loss >").unwrap_err().to_string(), "invalid filter at character 15: expected a value (a number, or text in quotes)");
    }

    #[test]
    fn like_wildcards() {
        assert!(like("style-ink", "style-%", false));
        assert!(like("abc", "a_c", false));
        assert!(!like("abc", "a_", false));
        assert!(like("", "%", false));
        assert!(like("ABC", "a%c", true));
        assert!(!like("ABC", "a%c", false));
    }
}
