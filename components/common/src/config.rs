//! Configuration: a YAML file in the Kubernetes component-config style,
//! merged with flags and environment, validated into a typed config.
//!
//! ```yaml
//! apiVersion: bulwark.dev/v1alpha1
//! kind: LoadBalancerConfiguration
//! nodeId: 1
//! admin:
//!   address: 127.0.0.1:9440
//! ```
//!
//! Why YAML with apiVersion/kind rather than TOML: the people who run
//! bulwark already write kubeadm's ClusterConfiguration and the kubelet's
//! KubeletConfiguration this way, keep them in the same repositories and
//! ConfigMaps, and ship them beside static pod manifests that are YAML too.
//! The versioned kind lets the schema evolve with explicit conversions, the
//! way Kubernetes component configs do.
//!
//! Precedence, highest first: flag, environment variable (every flag has
//! one, through clap), config file, built-in default. Flags become
//! [`Overrides`] on the parsed YAML tree before the typed config is built, so
//! one code path validates all sources and every error names the field's
//! path (`backends[2].address: …`). Unknown fields are rejected.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

/// The API group and version of every bulwark configuration kind.
pub const API_VERSION: &str = "bulwark.dev/v1alpha1";

/// A daemon's configuration kind.
pub trait ComponentConfig: DeserializeOwned + Validate {
    /// The `kind:` this type is read from, e.g. `LoadBalancerConfiguration`.
    const KIND: &'static str;

    /// Checks that read what the config points at and cross-check it with
    /// the rest (TLS material: key against certificate, identity against
    /// the access policy, usages, SANs against the addresses peers dial).
    /// Run by [`load`] (so by `--check-config` and at start), not by
    /// [`from_str_with`], so unit tests can parse configs without real
    /// certificates.
    fn preflight(&self, _v: &mut Validator) {}
}

/// Semantic validation after the types have parsed: ranges, cross-field
/// rules, files that must exist. Report every problem, not just the first.
pub trait Validate {
    /// Records problems in `v`, at paths relative to this value.
    fn validate(&self, v: &mut Validator);
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `backends[2].address`; empty for the document.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not YAML.
    #[error("config file {path} is not valid YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    /// One or more fields are wrong; all of them are listed.
    #[error("invalid configuration{}:\n{}", file_suffix(.file), list(.errors))]
    Invalid {
        file: Option<PathBuf>,
        errors: Vec<FieldError>,
        /// What validation also found legal but probably unintended:
        /// shown beside the errors, so one `--check-config` run lists
        /// everything to fix.
        warnings: Vec<FieldError>,
    },
}

impl ConfigError {
    /// The field errors, when the problem is with fields.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }

    /// The warnings found beside the field errors (none when validation
    /// did not get that far).
    pub fn warnings(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid { warnings, .. } => warnings,
            _ => &[],
        }
    }

    /// The field errors as `path: message` lines (none when the problem
    /// is not with fields): what tests compare against.
    pub fn messages(&self) -> Vec<String> {
        self.field_errors()
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

fn file_suffix(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collects [`FieldError`]s while walking a config.
#[derive(Debug, Default)]
pub struct Validator {
    path: Vec<String>,
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
    /// Skip [`Validator::file_exists`]: the config is checked away from
    /// the node whose files it names ([`check_offline`]).
    offline: bool,
}

impl Validator {
    /// Records a problem with the current field.
    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: self.current(),
            message: message.into(),
        });
    }

    /// Records something legal but probably unintended about the current
    /// field: printed by `--check-config` and logged at start, never fatal.
    pub fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(FieldError {
            path: self.current(),
            message: message.into(),
        });
    }

    /// Runs `f` one level down, at `field` (a name, or `[i]` for an index).
    pub fn at(&mut self, field: impl Into<String>, f: impl FnOnce(&mut Validator)) {
        self.path.push(field.into());
        f(self);
        self.path.pop();
    }

    /// Validates a nested value at `field`.
    pub fn nested<V: Validate + ?Sized>(&mut self, field: impl Into<String>, value: &V) {
        self.at(field, |v| value.validate(v));
    }

    /// Records `message` at `field` unless `ok`.
    pub fn check(&mut self, ok: bool, field: impl Into<String>, message: impl Into<String>) {
        if !ok {
            let message = message.into();
            self.at(field, |v| v.error(message));
        }
    }

    /// Checks that a file exists and is readable, naming what it is for.
    pub fn file_exists(&mut self, field: impl Into<String>, path: &Path) {
        if self.offline {
            return;
        }
        if let Err(e) = std::fs::File::open(path) {
            self.at(field, |v| {
                v.error(format!("cannot read {}: {e}", path.display()));
            });
        }
    }

    /// Whether checks may read the files a config names: false when the
    /// config is checked away from its node ([`check_offline`]). Checks
    /// that load a file (a key, a certificate) skip themselves when false.
    pub fn reads_files(&self) -> bool {
        !self.offline
    }

    /// Checks that a duration is within `[min, max]`.
    pub fn duration_in(
        &mut self,
        field: impl Into<String>,
        value: Duration,
        min: Duration,
        max: Duration,
    ) {
        if value < min || value > max {
            self.at(field, |v| {
                v.error(format!(
                    "{} is out of range: expected between {} and {}",
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ));
            });
        }
    }

    fn current(&self) -> String {
        let mut out = String::new();
        for seg in &self.path {
            if !out.is_empty() && !seg.starts_with('[') {
                out.push('.');
            }
            out.push_str(seg);
        }
        out
    }

    /// The problems found so far.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.errors
    }

    /// The warnings found so far.
    pub fn warnings(&self) -> &[FieldError] {
        &self.warnings
    }

    /// Checks that no two of a daemon's listeners share an address:port
    /// (or a port, when one of them binds every address): the second bind
    /// would fail at start. `listeners` are (field path, address).
    pub fn distinct_listeners(&mut self, listeners: &[(&str, SocketAddr)]) {
        for (i, (field, a)) in listeners.iter().enumerate() {
            // Port 0 asks the kernel for a free port: never a clash.
            let clash = listeners[..i].iter().find(|(_, b)| {
                a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            });
            if let Some((other, b)) = clash {
                self.at(*field, |v| {
                    v.error(format!(
                        "{a} clashes with {other} ({b}): both would listen on port {}; give each listener its own port",
                        a.port()
                    ))
                });
            }
        }
    }
}

/// Whether a config section of type `T` given with any one of its
/// fields (or none) keeps every other field's default: each daemon's test
/// runs it over its sections (`schedule: {retries: 3}` once turned
/// scheduled backups off). The error names the field that did not merge.
pub fn check_fields_merge<T>() -> Result<(), String>
where
    T: Default + Serialize + DeserializeOwned,
{
    let render = |t: T| serde_yaml_ng::to_value(t).map_err(|e| e.to_string());
    let default = render(T::default())?;
    let Value::Mapping(fields) = &default else {
        return Err(format!("the default is not a mapping: {default:?}"));
    };
    if fields.is_empty() {
        return Err("no fields".into());
    }
    let empty = std::iter::once((Value::Null, Mapping::new()));
    let alone = fields
        .iter()
        .map(|(f, v)| (f.clone(), Mapping::from_iter([(f.clone(), v.clone())])));
    for (field, given) in empty.chain(alone) {
        let given = Value::Mapping(given);
        let parsed: T = serde_yaml_ng::from_value(given.clone())
            .map_err(|e| format!("{given:?} does not parse: {e}"))?;
        if render(parsed)? != default {
            return Err(format!(
                "{field:?} given alone loses other fields' defaults"
            ));
        }
    }
    Ok(())
}

/// A config section's path in the file and [`check_fields_merge`] for its
/// type.
pub type SectionCheck = (&'static str, fn() -> Result<(), String>);

/// Runs the check of every section a daemon lists; the error names the
/// first section that does not merge, then the field.
pub fn check_sections_merge(sections: &[SectionCheck]) -> Result<(), String> {
    sections
        .iter()
        .try_for_each(|(name, check)| check().map_err(|e| format!("{name}: {e}")))
}

/// A daemon's config test: each listed section (`"path" => Type`) merges
/// with its defaults ([`check_fields_merge`]); panics naming the first
/// section and field that does not.
#[macro_export]
macro_rules! assert_sections_merge {
    ($($section:literal => $ty:ty),+ $(,)?) => {{
        let sections: &[$crate::config::SectionCheck] =
            &[$(($section, $crate::config::check_fields_merge::<$ty>)),+];
        if let Err(e) = $crate::config::check_sections_merge(sections) {
            panic!("{e}");
        }
    }};
}

/// Validates `value` as if it sat at `prefix`; convenient in tests.
pub fn validate_at<V: Validate + ?Sized>(prefix: &str, value: &V) -> Vec<FieldError> {
    let mut v = Validator::default();
    if prefix.is_empty() {
        value.validate(&mut v);
    } else {
        v.nested(prefix, value);
    }
    v.into_errors()
}

/// Values set from flags or the environment, by field path
/// (`admin.address`), applied over the file before typing.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    entries: Vec<(String, Value)>,
}

impl Overrides {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `path` (dot-separated camelCase field names) to `value`.
    pub fn set(&mut self, path: &str, value: impl Serialize) -> &mut Self {
        // Serializing plain values (numbers, strings, lists) into a YAML
        // tree cannot fail; a failure would be a programming error in the
        // caller's flag type, so it is reported at the field.
        let value = serde_yaml_ng::to_value(value)
            .unwrap_or_else(|e| Value::String(format!("<unserializable override: {e}>")));
        self.entries.push((path.to_owned(), value));
        self
    }

    /// Sets `path` when `value` is `Some`.
    pub fn set_opt<T: Serialize>(&mut self, path: &str, value: Option<T>) -> &mut Self {
        if let Some(v) = value {
            self.set(path, v);
        }
        self
    }

    fn apply(&self, root: &mut Mapping) {
        for (path, value) in &self.entries {
            let mut node = &mut *root;
            let mut parts = path.split('.').peekable();
            while let Some(part) = parts.next() {
                let key = Value::String(part.to_owned());
                if parts.peek().is_none() {
                    node.insert(key, value.clone());
                    break;
                }
                let entry = node
                    .entry(key)
                    .or_insert_with(|| Value::Mapping(Mapping::new()));
                if !entry.is_mapping() {
                    *entry = Value::Mapping(Mapping::new());
                }
                match entry {
                    Value::Mapping(m) => node = m,
                    _ => break,
                }
            }
        }
    }
}

/// A configuration that loaded, with what was legal but suspicious.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The typed, validated configuration.
    pub config: T,
    /// Warnings (`path: message`), for `--check-config` to print and the
    /// daemon to log.
    pub warnings: Vec<FieldError>,
}

/// Reads the config file (when given), checks `apiVersion`/`kind`, applies
/// `overrides`, and builds and validates the typed config. Without a file the
/// config is built from defaults and overrides alone.
pub fn load<T: ComponentConfig>(
    file: Option<&Path>,
    overrides: &Overrides,
) -> Result<T, ConfigError> {
    load_checked(file, overrides).map(|l| l.config)
}

/// [`load`] plus the config's [`ComponentConfig::preflight`] checks, keeping
/// the warnings: what a daemon runs at start and for `--check-config`.
pub fn load_checked<T: ComponentConfig>(
    file: Option<&Path>,
    overrides: &Overrides,
) -> Result<Loaded<T>, ConfigError> {
    let text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
        ),
        None => None,
    };
    build::<T>(text.as_deref(), file, overrides, Mode::Preflight)
}

/// [`load`] from text already in memory; `origin` names it in errors.
/// Runs [`Validate`] but not the preflight checks.
pub fn from_str_with<T: ComponentConfig>(
    text: Option<&str>,
    origin: Option<&Path>,
    overrides: &Overrides,
) -> Result<T, ConfigError> {
    build::<T>(text, origin, overrides, Mode::Validate).map(|l| l.config)
}

/// Parses and validates `text` as a generator does before writing a
/// config for another machine: every check except those that read the
/// files the config names (certificates, keys, tools), which exist only on
/// the node; `--check-config` there runs them.
pub fn check_offline<T: ComponentConfig>(text: &str) -> Result<Loaded<T>, ConfigError> {
    build::<T>(Some(text), None, &Overrides::new(), Mode::Offline)
}

/// How much of the checking [`build`] does.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Field validation, files included.
    Validate,
    /// Field validation and the preflight checks.
    Preflight,
    /// Field validation without reading files.
    Offline,
}

fn build<T: ComponentConfig>(
    text: Option<&str>,
    origin: Option<&Path>,
    overrides: &Overrides,
    mode: Mode,
) -> Result<Loaded<T>, ConfigError> {
    let invalid = |errors: Vec<FieldError>, warnings: Vec<FieldError>| ConfigError::Invalid {
        file: origin.map(Path::to_owned),
        errors,
        warnings,
    };
    let mut root = match text {
        None => Mapping::new(),
        Some(text) => {
            let value: Value = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax {
                path: origin.map(Path::to_owned).unwrap_or_default(),
                message: e.to_string(),
            })?;
            match value {
                Value::Mapping(m) => m,
                // An empty file parses as null: treat it as an empty document
                // so the header check below gives the useful message.
                Value::Null => Mapping::new(),
                other => {
                    return Err(invalid(
                        vec![FieldError {
                            path: String::new(),
                            message: format!(
                                "expected a mapping with apiVersion and kind at the top level, found {}",
                                kind_of(&other)
                            ),
                        }],
                        Vec::new(),
                    ));
                }
            }
        }
    };

    if text.is_some() {
        let mut errors = Vec::new();
        check_header(&mut root, "apiVersion", API_VERSION, &mut errors);
        check_header(&mut root, "kind", T::KIND, &mut errors);
        if !errors.is_empty() {
            return Err(invalid(errors, Vec::new()));
        }
    }
    overrides.apply(&mut root);

    let config: T = deserialize_all(root).map_err(|errors| invalid(errors, Vec::new()))?;
    let mut v = Validator {
        offline: mode == Mode::Offline,
        ..Validator::default()
    };
    config.validate(&mut v);
    if mode == Mode::Preflight {
        // A field validation already refused (a file that cannot be read)
        // is not reported a second time by the checks that read it.
        let known: Vec<String> = v.errors.iter().map(|e| e.path.clone()).collect();
        let mut pre = Validator::default();
        config.preflight(&mut pre);
        v.warnings.extend(pre.warnings);
        v.errors
            .extend(pre.errors.into_iter().filter(|e| !known.contains(&e.path)));
    }
    let warnings = v.warnings.clone();
    let errors = v.into_errors();
    if errors.is_empty() {
        Ok(Loaded { config, warnings })
    } else {
        Err(invalid(errors, warnings))
    }
}

/// Most problems one load reports; a file that is wrong everywhere is
/// wrong enough at fifty.
const MAX_TYPE_ERRORS: usize = 50;

/// Builds the typed config, reporting every field that does not type-check
/// rather than the first: after each error the offending field is taken
/// out of the tree (its default applies) and the build is retried.
fn deserialize_all<T: DeserializeOwned>(mut root: Mapping) -> Result<T, Vec<FieldError>> {
    let mut errors: Vec<FieldError> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize(Value::Mapping(root.clone())) {
            Ok(config) if errors.is_empty() => return Ok(config),
            Ok(_) => return Err(errors),
            Err(e) => e,
        };
        let segments: Vec<serde_path_to_error::Segment> = e.path().iter().cloned().collect();
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = plain_words(&e.into_inner().to_string());
        // A required field reported missing because an earlier error took
        // it out is no news.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'));
        if let Some(field) = missing {
            let full = if path.is_empty() {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            if !removed.contains(&full) {
                errors.push(FieldError { path, message });
            }
            return Err(errors);
        }
        errors.push(FieldError {
            path: path.clone(),
            message,
        });
        if errors.len() >= MAX_TYPE_ERRORS || !remove_at(&mut root, &segments) {
            return Err(errors);
        }
        removed.push(path);
    }
}

/// Removes the field at `segments`; false when there is none, or when it
/// is a list item (removing it would renumber the items after it).
fn remove_at(root: &mut Mapping, segments: &[serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    let Some((Segment::Map { key }, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = &mut *root;
    let mut parents = parents.iter();
    loop {
        let Some(seg) = parents.next() else {
            return node.remove(key.as_str()).is_some();
        };
        let mut child = match seg {
            Segment::Map { key } => node.get_mut(key.as_str()),
            _ => None,
        };
        // Lists are stepped through here (`backends[0].weight`).
        while let Some(Value::Sequence(items)) = child {
            child = match parents.next() {
                Some(Segment::Seq { index }) => items.get_mut(*index),
                _ => None,
            };
        }
        match child {
            Some(Value::Mapping(m)) => node = m,
            _ => return false,
        }
    }
}

/// Rewrites serde's type names in an error message into the words of
/// YAML: "expected u64" becomes "expected a whole number ≥ 0".
fn plain_words(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number ≥ 0"),
        ("expected usize", "expected a whole number ≥ 0"),
        ("expected i8", "expected a whole number"),
        ("expected i16", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected isize", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a mapping"),
        ("invalid type: map,", "invalid type: a mapping,"),
        ("invalid type: sequence,", "invalid type: a list,"),
        ("invalid type: unit value,", "invalid type: null,"),
        ("invalid type: floating point", "invalid type: the number"),
        ("invalid type: integer", "invalid type: the number"),
        ("invalid value: integer", "invalid value: the number"),
        ("invalid type: boolean", "invalid type: the boolean"),
    ];
    let mut out = message.to_owned();
    for (from, to) in WORDS {
        // Only whole words: "expected u16" must not rewrite "expected u160".
        let mut rebuilt = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(from) {
            let after = &rest[at + from.len()..];
            let whole = !after.starts_with(|c: char| c.is_ascii_alphanumeric());
            rebuilt.push_str(&rest[..at]);
            rebuilt.push_str(if whole { to } else { from });
            rest = after;
        }
        rebuilt.push_str(rest);
        out = rebuilt;
    }
    // "expected struct RaftConfig" names a Rust type: say what YAML it wants.
    if let Some(at) = out.find("expected struct ") {
        out.truncate(at);
        out.push_str("expected a mapping of fields");
    }
    out
}

fn check_header(root: &mut Mapping, key: &str, want: &str, errors: &mut Vec<FieldError>) {
    match root.remove(key) {
        Some(Value::String(got)) if got == want => {}
        Some(Value::String(got)) => errors.push(FieldError {
            path: key.to_owned(),
            message: format!("expected {want:?}, found {got:?}"),
        }),
        Some(other) => errors.push(FieldError {
            path: key.to_owned(),
            message: format!("expected the string {want:?}, found {}", kind_of(&other)),
        }),
        None => errors.push(FieldError {
            path: key.to_owned(),
            message: format!("missing; expected {want:?}"),
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Serde adapter for durations written the way operators write them:
/// `500ms`, `2s`, `1m30s`. Use with `#[serde(with = "bulwark_common::config::duration")]`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as a human-readable duration.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads a human-readable duration such as `250ms` or `1m30s`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}): expected e.g. \"500ms\", \"2s\" or \"1m30s\""
            ))
        })
    }

    /// The same for `Option<Duration>`: absent or null is `None`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `Some(d)` as a duration and `None` as null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Reads an optional duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Sample {
        node_id: u64,
        #[serde(default = "default_listen")]
        listen: SocketAddr,
        #[serde(default, with = "duration::option")]
        timeout: Option<Duration>,
        #[serde(default)]
        backends: Vec<SampleBackend>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct SampleBackend {
        address: SocketAddr,
        #[serde(default = "one")]
        weight: u32,
    }

    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6443))
    }

    fn one() -> u32 {
        1
    }

    impl Validate for Sample {
        fn validate(&self, v: &mut Validator) {
            v.check(self.node_id > 0, "nodeId", "must be greater than 0");
            for (i, b) in self.backends.iter().enumerate() {
                v.at(format!("backends[{i}]"), |v| {
                    v.check(b.weight <= 100, "weight", "must be at most 100");
                });
            }
        }
    }

    impl ComponentConfig for Sample {
        const KIND: &'static str = "SampleConfiguration";
    }

    const HEADER: &str = "apiVersion: bulwark.dev/v1alpha1\nkind: SampleConfiguration\n";

    fn parse(body: &str) -> Result<Sample, ConfigError> {
        from_str_with(Some(&format!("{HEADER}{body}")), None, &Overrides::new())
    }

    fn only_error(r: Result<Sample, ConfigError>) -> String {
        let err = r.unwrap_err();
        let errs = err.field_errors();
        assert_eq!(errs.len(), 1, "{err}");
        errs[0].to_string()
    }

    #[test]
    fn a_valid_file_loads_with_defaults() {
        let c = parse("nodeId: 3\ntimeout: 250ms\nbackends:\n- address: 10.0.0.1:6443\n").unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.timeout, Some(Duration::from_millis(250)));
        assert_eq!(c.backends[0].address, "10.0.0.1:6443".parse().unwrap());
        assert_eq!(c.backends[0].weight, 1);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_path() {
        let e = only_error(parse(
            "nodeId: 1\nbackends:\n- address: 10.0.0.1:6443\n  wieght: 3\n",
        ));
        assert_eq!(
            e,
            "backends[0].wieght: unknown field `wieght`, expected `address` or `weight`"
        );
    }

    #[test]
    fn bad_values_name_the_field_and_what_was_expected() {
        let e = only_error(parse("nodeId: 1\nbackends:\n- address: not-an-address\n"));
        assert!(e.starts_with("backends[0].address:"), "{e}");
        assert!(e.contains("socket address"), "{e}");

        let e = only_error(parse("nodeId: 1\ntimeout: soon\n"));
        assert!(e.starts_with("timeout: invalid duration \"soon\""), "{e}");

        let e = only_error(parse("nodeId: one\n"));
        assert!(e.starts_with("nodeId: invalid type"), "{e}");
        // In YAML's words, not Rust's.
        assert!(e.contains("expected a whole number ≥ 0"), "{e}");
        assert!(!e.contains("u64"), "{e}");
        let e = only_error(parse("nodeId: 1\nbackends: {a: 1}\n"));
        assert!(
            e.contains("invalid type: a mapping, expected a list"),
            "{e}"
        );
        let e = only_error(parse("nodeId: 1\nbackends:\n- 3\n"));
        assert!(
            e.contains("the number `3`, expected a mapping of fields"),
            "{e}"
        );
        let e = only_error(parse("nodeId: -1\n"));
        assert!(e.contains("expected a whole number ≥ 0"), "{e}");
    }

    #[test]
    fn plain_words_rewrite_whole_words_only() {
        assert_eq!(
            plain_words("invalid type: string \"x\", expected u16"),
            "invalid type: string \"x\", expected a whole number from 0 to 65535"
        );
        assert_eq!(plain_words("expected u160 things"), "expected u160 things");
    }

    #[test]
    fn type_errors_are_all_reported_at_once() {
        let err = parse(
            "nodeId: 1\ntimeout: soon\nlisten: nowhere\nbackends:\n- address: 10.0.0.1:1\n  weight: heavy\n  colour: red\n",
        )
        .unwrap_err();
        let errs = err.messages();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        for field in [
            "listen:",
            "timeout:",
            "backends[0].weight:",
            "backends[0].colour:",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(field)),
                "{field} in {errs:#?}"
            );
        }

        // A required field with a bad value is reported once, not again as
        // missing after it was taken out.
        let errs = parse("nodeId: x\ntimeout: soon\n").unwrap_err();
        let errs = errs.messages();
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs.iter().all(|e| !e.contains("missing")), "{errs:#?}");
    }

    #[test]
    fn listeners_must_not_share_a_port() {
        let mut v = Validator::default();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        v.distinct_listeners(&[
            ("raft.address", a("0.0.0.0:9441")),
            ("api.address", a("10.0.0.1:9441")),
            ("admin.address", a("127.0.0.1:9440")),
            ("localListener", a("127.0.0.2:9440")),
            // Two "any free port" requests get two ports.
            ("grpc.address", a("127.0.0.1:0")),
            ("metrics.address", a("127.0.0.1:0")),
        ]);
        let errs: Vec<String> = v.into_errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0]
                .starts_with("api.address: 10.0.0.1:9441 clashes with raft.address (0.0.0.0:9441)"),
            "{errs:#?}"
        );
    }

    #[test]
    fn warnings_and_preflight_come_from_load_checked_only() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Warned {
            n: u64,
        }
        impl Validate for Warned {
            fn validate(&self, v: &mut Validator) {
                if self.n > 10 {
                    v.at("n", |v| v.warn("is large"));
                }
            }
        }
        impl ComponentConfig for Warned {
            const KIND: &'static str = "WarnedConfiguration";
            fn preflight(&self, v: &mut Validator) {
                v.check(self.n != 13, "n", "is unlucky");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.yaml");
        let write = |n: u64| {
            std::fs::write(
                &file,
                format!("apiVersion: bulwark.dev/v1alpha1\nkind: WarnedConfiguration\nn: {n}\n"),
            )
            .unwrap()
        };
        write(11);
        let loaded = load_checked::<Warned>(Some(&file), &Overrides::new()).unwrap();
        assert_eq!(loaded.config.n, 11);
        assert_eq!(loaded.warnings[0].to_string(), "n: is large");
        write(13);
        let err = load_checked::<Warned>(Some(&file), &Overrides::new()).unwrap_err();
        assert_eq!(err.field_errors()[0].to_string(), "n: is unlucky");
        // The warning found beside the error comes with it.
        assert_eq!(err.warnings()[0].to_string(), "n: is large");
        // Parsing from text skips the preflight checks.
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(from_str_with::<Warned>(Some(&text), None, &Overrides::new()).is_ok());
    }

    #[test]
    fn validation_reports_every_problem() {
        let err =
            parse("nodeId: 0\nbackends:\n- address: 10.0.0.1:1\n  weight: 500\n").unwrap_err();
        let errs = err.messages();
        assert_eq!(
            errs,
            vec![
                "nodeId: must be greater than 0",
                "backends[0].weight: must be at most 100"
            ]
        );
    }

    #[test]
    fn header_is_checked() {
        let r: Result<Sample, _> = from_str_with(
            Some("apiVersion: v1\nkind: Pod\nnodeId: 1\n"),
            Some(Path::new("/etc/bulwark/lb.yaml")),
            &Overrides::new(),
        );
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("in /etc/bulwark/lb.yaml"), "{msg}");
        assert!(
            msg.contains("apiVersion: expected \"bulwark.dev/v1alpha1\", found \"v1\""),
            "{msg}"
        );
        assert!(
            msg.contains("kind: expected \"SampleConfiguration\", found \"Pod\""),
            "{msg}"
        );

        let r: Result<Sample, _> = from_str_with(Some("- a\n- b\n"), None, &Overrides::new());
        assert!(r.unwrap_err().to_string().contains("found a list"));
        let r: Result<Sample, _> = from_str_with(Some(""), None, &Overrides::new());
        assert!(r.unwrap_err().to_string().contains("apiVersion: missing"));
    }

    #[test]
    fn overrides_win_over_the_file_and_stand_alone() {
        let mut o = Overrides::new();
        o.set("nodeId", 7u64).set("listen", "127.0.0.2:7445");
        let c: Sample = from_str_with(Some(&format!("{HEADER}nodeId: 1\n")), None, &o).unwrap();
        assert_eq!(c.node_id, 7);
        assert_eq!(c.listen, "127.0.0.2:7445".parse().unwrap());

        // No file at all: defaults plus flags.
        let c: Sample = from_str_with(None, None, &o).unwrap();
        assert_eq!(c.node_id, 7);

        // A bad flag value is reported at the field it overrides.
        let mut o = Overrides::new();
        o.set("nodeId", "x");
        let err = from_str_with::<Sample>(None, None, &o).unwrap_err();
        assert!(err.field_errors()[0].to_string().starts_with("nodeId:"));
    }

    #[test]
    fn missing_file_and_bad_yaml_are_clear() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/lb.yaml")), &Overrides::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read config file /nonexistent/lb.yaml"),
            "{err}"
        );
        let err =
            from_str_with::<Sample>(Some("a: [1"), Some(Path::new("x.yaml")), &Overrides::new())
                .unwrap_err()
                .to_string();
        assert!(err.contains("x.yaml is not valid YAML"), "{err}");
    }

    /// A section whose missing field falls back to the type's zero rather
    /// than to the default the type itself documents.
    #[derive(Debug, serde::Serialize, Deserialize)]
    struct Lossy {
        #[serde(default)]
        retries: u32,
        #[serde(default)]
        enabled: bool,
    }

    impl Default for Lossy {
        fn default() -> Self {
            Self {
                retries: 3,
                enabled: true,
            }
        }
    }

    #[derive(Debug, Default, serde::Serialize, Deserialize)]
    #[serde(default)]
    struct Merging {
        retries: u32,
    }

    #[test]
    fn the_section_that_does_not_merge_is_named() {
        let sections: &[SectionCheck] = &[
            ("merging", check_fields_merge::<Merging>),
            ("lossy", check_fields_merge::<Lossy>),
        ];
        let err = check_sections_merge(sections).unwrap_err();
        assert!(err.starts_with("lossy: "), "{err}");
        assert!(check_sections_merge(&sections[..1]).is_ok());
    }
}
