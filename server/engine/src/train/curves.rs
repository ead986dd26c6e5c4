//! Training curves: an append-only CSV log of metrics per step ([`CsvLog`]); they are
//! drawn by [`super::plot::plot_png`].
//!
//! The log survives a resumed run: reopening it with the step the checkpoint was taken at
//! drops the rows written after that step, so the curves carry no duplicates.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The rows of a [`CsvLog`]: `(step, values)`, values in column order.
pub type LogRows = Vec<(u64, Vec<f64>)>;

/// An append-only CSV log of training metrics: a `step` column, then the named columns.
/// Every row is written with one call and flushed, so a crash loses at most the row being
/// written.
#[derive(Debug)]
pub struct CsvLog {
    path: PathBuf,
    file: File,
    columns: usize,
}

impl CsvLog {
    /// Opens the log at `path` with the given value `columns` (the `step` column is
    /// implicit and comes first).
    ///
    /// A missing (or empty) file is created with a header. An existing file must have the
    /// same header; when `keep_through_step` is `Some(s)` only its rows with `step <= s`
    /// are kept (a run resumed from the checkpoint of step `s` then continues without
    /// duplicates), with `None` all rows are kept. A final line cut short by a crash is
    /// dropped.
    pub fn open(path: &Path, columns: &[&str], keep_through_step: Option<u64>) -> Result<Self> {
        validate_columns(columns)?;
        let header = std::iter::once("step").chain(columns.iter().copied()).collect::<Vec<_>>().join(",");
        let existing = match fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(path, e)),
        };
        match existing.filter(|t| !t.is_empty()) {
            None => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                fs::write(path, format!("{header}\n")).map_err(|e| Error::io(path, e))?;
            }
            Some(text) => {
                let found = text.lines().next().unwrap_or_default();
                if found != header {
                    return Err(Error::invalid(
                        "columns",
                        format!("{} has columns `{found}`, this run logs `{header}`", path.display()),
                    ));
                }
                let rows = parse_rows(path, &text, columns.len())?;
                let kept: Vec<&Row> = rows.iter().filter(|r| keep_through_step.is_none_or(|s| r.step <= s)).collect();
                let complete = text.ends_with('\n') && kept.len() == rows.len() && rows.len() == rows_in(&text);
                if !complete {
                    let mut out = format!("{header}\n");
                    for r in kept {
                        out.push_str(r.line);
                        out.push('\n');
                    }
                    crate::files::write_atomic(path, out.as_bytes()).map_err(|e| Error::io(path, e))?;
                }
            }
        }
        let file = OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file, columns: columns.len() })
    }

    /// Appends the row for `step`; `values` must have one value per column. Non-finite
    /// values are written as `NaN`, `inf` or `-inf` and read back as such.
    pub fn append(&mut self, step: u64, values: &[f64]) -> Result<()> {
        if values.len() != self.columns {
            return Err(Error::invalid(
                "values",
                format!("{} values for {} columns of {}", values.len(), self.columns, self.path.display()),
            ));
        }
        let mut line = step.to_string();
        for v in values {
            // `Display` for f64 is the shortest text that parses back to the same value.
            line.push(',');
            line.push_str(&v.to_string());
        }
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Reads a log: the value column names (without `step`) and the rows as
    /// `(step, values)`. A last line without a newline (a row being written, or cut short
    /// by a crash) is skipped, so a log can be read while it is written.
    pub fn read(path: &Path) -> Result<(Vec<String>, LogRows)> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let header = text.lines().next().unwrap_or_default();
        let mut names = header.split(',');
        if names.next() != Some("step") {
            return Err(Error::invalid(
                "csv log",
                format!("{}: the header does not start with `step`", path.display()),
            ));
        }
        let columns: Vec<String> = names.map(str::to_string).collect();
        let rows = parse_rows(path, &text, columns.len())?;
        Ok((columns, rows.into_iter().map(|r| (r.step, r.values)).collect()))
    }
}

/// One parsed data row and its original text.
struct Row<'a> {
    step: u64,
    values: Vec<f64>,
    line: &'a str,
}

fn validate_columns(columns: &[&str]) -> Result<()> {
    if columns.is_empty() {
        return Err(Error::invalid("columns", "a log needs at least one value column"));
    }
    for (i, c) in columns.iter().enumerate() {
        if c.is_empty() || c.contains([',', '\n', '\r', '"']) || *c == "step" {
            return Err(Error::invalid(
                "columns",
                format!("column name {c:?} is empty, reserved or contains , \" or a newline"),
            ));
        }
        if columns[..i].contains(c) {
            return Err(Error::invalid("columns", format!("column {c:?} appears twice")));
        }
    }
    Ok(())
}

/// Number of data lines (after the header) in `text`.
fn rows_in(text: &str) -> usize {
    text.lines().skip(1).filter(|l| !l.is_empty()).count()
}

/// Parses the data lines of a log with `n` value columns. A last line without a newline
/// (a write cut short) is dropped; any bad line is an error.
fn parse_rows<'a>(path: &Path, text: &'a str, n: usize) -> Result<Vec<Row<'a>>> {
    let lines: Vec<&str> = text.lines().skip(1).collect();
    let mut rows = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        // The writer ends every row with a newline: a last line without one was cut short.
        if i + 1 == lines.len() && !text.ends_with('\n') {
            break;
        }
        match parse_line(line, n) {
            Some((step, values)) => rows.push(Row { step, values, line }),
            None => {
                return Err(Error::invalid(
                    "csv log",
                    format!("{} line {}: expected a step and {n} numbers, found `{line}`", path.display(), i + 2),
                ))
            }
        }
    }
    Ok(rows)
}

fn parse_line(line: &str, n: usize) -> Option<(u64, Vec<f64>)> {
    let mut fields = line.split(',');
    let step = fields.next()?.trim().parse().ok()?;
    let values: Vec<f64> = fields.map(|f| f.trim().parse().ok()).collect::<Option<_>>()?;
    (values.len() == n).then_some((step, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_log_appends_and_resumes_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join("train.csv");
        let mut log = CsvLog::open(&path, &["loss", "lr"], None).unwrap();
        for step in 1..=5u64 {
            log.append(step, &[1.0 / step as f64, 1e-4]).unwrap();
        }
        assert!(matches!(log.append(6, &[1.0]), Err(Error::InvalidInput { .. })));
        drop(log);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().next(), Some("step,loss,lr"));
        assert_eq!(text.lines().nth(2), Some("2,0.5,0.0001"));

        // Resume from the checkpoint of step 3: rows 4 and 5 go, new ones follow.
        let mut log = CsvLog::open(&path, &["loss", "lr"], Some(3)).unwrap();
        log.append(4, &[0.3, f64::NAN]).unwrap();
        drop(log);
        let (columns, rows) = CsvLog::read(&path).unwrap();
        assert_eq!(columns, vec!["loss".to_string(), "lr".to_string()]);
        let steps: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert_eq!(rows[2].1, vec![1.0 / 3.0, 1e-4]);
        assert_eq!(rows[3].1[0], 0.3);
        assert!(rows[3].1[1].is_nan());

        // Reopening without a step keeps everything; a different header is refused.
        CsvLog::open(&path, &["loss", "lr"], None).unwrap();
        assert_eq!(CsvLog::read(&path).unwrap().1.len(), 4);
        let err = CsvLog::open(&path, &["loss"], None).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { field: "columns", .. }), "{err}");
        assert!(CsvLog::open(&path, &["step"], None).is_err());
        assert!(CsvLog::open(&path, &[], None).is_err());
    }

    #[test]
    fn csv_log_drops_a_torn_last_line_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        fs::write(&path, "step,loss\n1,0.5\n2,0.4\n3,0.").unwrap();
        // Readers skip the torn row (even though `0.` would parse); reopening removes it.
        assert_eq!(CsvLog::read(&path).unwrap().1.len(), 2);
        let mut log = CsvLog::open(&path, &["loss"], None).unwrap();
        log.append(3, &[0.3]).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "step,loss\n1,0.5\n2,0.4\n3,0.3\n");

        fs::write(&path, "step,loss\n1,abc\n2,0.4\n").unwrap();
        let err = CsvLog::read(&path).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        fs::write(&path, "loss\n1\n").unwrap();
        assert!(CsvLog::read(&path).is_err());
        assert!(matches!(CsvLog::read(&dir.path().join("missing.csv")), Err(Error::Io { .. })));
    }
}
