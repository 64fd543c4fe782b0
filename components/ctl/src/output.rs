//! `-o table|json|yaml`: every command builds a serializable view of what it
//! got (not the raw protobuf, so the output stays stable when the wire
//! changes) and prints it in the chosen format.

use std::io::Write as _;

use serde::Serialize;

use crate::error::{CliError, Exit};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
    /// YAML for scripts and people.
    Yaml,
}

/// Prints `value` as JSON or YAML, or as the text `table` renders.
pub fn print<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    let text = render(format, value, table)?;
    emit(text.as_bytes())
}

/// Writes to stdout: the one way bulwarkctl prints results. A reader that
/// went away (`bulwarkctl … | head -1`) is not an error: the rest is
/// dropped quietly, as other Unix tools do, instead of a panic or a message.
pub fn emit(bytes: &[u8]) -> Result<(), CliError> {
    emit_to(&mut std::io::stdout().lock(), bytes)
}

/// A line for the operator on stderr, beside the result on stdout (which
/// stays machine-readable). A closed stderr loses the note, nothing more.
pub fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn emit_to(out: &mut impl std::io::Write, bytes: &[u8]) -> Result<(), CliError> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::new(
            Exit::Failure,
            format!("cannot write to stdout: {e}"),
        )),
    }
}

/// What [`print`] prints.
pub fn render<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<String, CliError> {
    let fail = |e: &dyn std::fmt::Display| {
        CliError::new(Exit::Failure, format!("cannot render output: {e}"))
    };
    Ok(match format {
        OutputFormat::Table => table(value),
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(value).map_err(|e| fail(&e))?;
            s.push('\n');
            s
        }
        OutputFormat::Yaml => serde_yaml_ng::to_string(value).map_err(|e| fail(&e))?,
    })
}

/// Aligned columns: a header row, then one row per item. Cells are padded to
/// the widest cell of their column (by characters).
pub fn table<R: AsRef<[String]>>(header: &[&str], rows: &[R]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.as_ref().iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            l.push_str(cell);
            for _ in cell.chars().count()..w + 2 {
                l.push(' ');
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.as_ref().iter().map(String::as_str));
    }
    out
}

/// `key: value` lines with the keys aligned, for single objects.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k}:{:pad$} {v}\n", "", pad = w - k.chars().count()))
        .collect()
}

/// `text` between `before` and `after`, or nothing when `text` is empty:
/// an optional part of a line (` (detail)`, `, error: …`).
pub fn part(before: &str, text: &str, after: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("{before}{text}{after}")
    }
}

/// Bytes for people: `672 B`, `1.5 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A protobuf duration as JSON and YAML carry it: seconds, a number (the
/// field's name ends in `_seconds`); `None` when absent or negative.
pub fn seconds(d: Option<&prost_types::Duration>) -> Option<f64> {
    bulwark_api::time::duration_from_proto(d?)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// Seconds for people, to the millisecond: `420ms`, `3h 1m 2s`, `1s 500ms`;
/// `-` when unknown.
pub fn duration_text(secs: Option<f64>) -> String {
    match secs.and_then(|s| std::time::Duration::try_from_secs_f64(s).ok()) {
        Some(d) => humantime::format_duration(std::time::Duration::from_millis(
            d.as_millis().try_into().unwrap_or(u64::MAX),
        ))
        .to_string(),
        None => "-".into(),
    }
}

/// A protobuf enum value as operators read it: its name without the
/// `prefix`, lower-case (`VERDICT_DOWN` → `down`); the number when unknown.
pub fn enum_name<E: TryFrom<i32>>(
    v: i32,
    name: impl Fn(&E) -> &'static str,
    prefix: &str,
) -> String {
    E::try_from(v)
        .map(|e| name(&e).trim_start_matches(prefix).to_lowercase())
        .unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Closed;

    impl std::io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_quiet_and_other_write_errors_are_not() {
        assert!(emit_to(&mut Closed, b"x\n").is_ok());
        let mut full = std::io::Cursor::new([0u8; 1]);
        let e = emit_to(&mut full, b"too long").unwrap_err();
        assert_eq!(e.exit(), Exit::Failure);
    }

    #[test]
    fn durations_are_seconds_for_scripts_and_words_for_people() {
        let d = prost_types::Duration {
            seconds: 1,
            nanos: 503_000_000,
        };
        assert!((seconds(Some(&d)).unwrap() - 1.503).abs() < 1e-9);
        assert_eq!(seconds(None), None);
        assert_eq!(duration_text(Some(1.503)), "1s 503ms");
        assert_eq!(duration_text(Some(0.4204)), "420ms");
        assert_eq!(duration_text(None), "-");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["api-1".to_string(), "a".into(), "up".into()],
            vec!["apiserver-long".to_string(), "b".into(), "draining".into()],
        ];
        let t = table(&["BACKEND", "ZONE", "VERDICT"], &rows);
        assert_eq!(
            t,
            "BACKEND         ZONE  VERDICT\napi-1           a     up\napiserver-long  b     draining\n"
        );
    }

    #[test]
    fn formats_render() {
        #[derive(Serialize)]
        struct V {
            leader: u64,
        }
        let v = V { leader: 2 };
        assert_eq!(
            render(OutputFormat::Json, &v, |_| String::new()).unwrap(),
            "{\n  \"leader\": 2\n}\n"
        );
        assert_eq!(
            render(OutputFormat::Yaml, &v, |_| String::new()).unwrap(),
            "leader: 2\n"
        );
        assert_eq!(
            render(OutputFormat::Table, &v, |v| fields(&[
                ("leader", v.leader.to_string()),
                ("vip", "x".into())
            ]))
            .unwrap(),
            "leader: 2\nvip:    x\n"
        );
    }

    #[test]
    fn an_empty_part_leaves_no_separators() {
        assert_eq!(part(" (", "", ")"), "");
        assert_eq!(part(" (", "kept", ")"), " (kept)");
        assert_eq!(part(", error: ", "refused", ""), ", error: refused");
    }
}
