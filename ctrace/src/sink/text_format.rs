//! Prometheus' text exposition format (0.0.4), written from one snapshot.
//!
//! Written here rather than with the `prometheus` crate: that crate keeps
//! every value in a 64-bit atomic, which 32-bit MIPS (most OpenWrt routers)
//! does not have, so it cannot build there. ctrace renders each interval
//! from a snapshot and needs no atomics at all: families are plain maps.
//! The layout is that crate's TextEncoder's: families by name, labels by
//! name, series by their label values, empty families left out. Integers
//! are written exactly (the crate went through f64), infinities as `+Inf`
//! and `-Inf` as the format asks.
use std::{cell::RefCell, collections::BTreeMap, fmt::Write as _, rc::Rc};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid metric name {0:?}")]
    Name(String),
    #[error("{family}: invalid or repeated label name {label:?}")]
    Label { family: String, label: String },
    #[error("{0}: registered twice")]
    Duplicate(String),
    #[error("{0}: no help text")]
    Help(String),
    #[error("{family}: {got} label values for {want} labels")]
    Arity {
        family: String,
        got: usize,
        want: usize,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Counter,
    Gauge,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Value {
    Int(i64),
    Uint(u64),
    Float(f64),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Uint(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    /// Label names, sorted.
    labels: Vec<String>,
    /// Where each label, in the order the caller gives values, goes.
    order: Vec<usize>,
    /// Label values (in `labels` order) to value.
    series: BTreeMap<Vec<String>, Value>,
    /// The first series given the wrong number of label values (got,
    /// want): a caller's mistake, reported by render, never a panic.
    misuse: Option<(usize, usize)>,
}

/// One metric family, filled through `with_label_values`.
#[derive(Clone)]
pub struct FamilyHandle(Rc<RefCell<Family>>);

/// One series of a family, about to be given its value.
pub struct Series<'a> {
    family: &'a FamilyHandle,
    values: &'a [&'a str],
}

impl FamilyHandle {
    /// The series with these label values, in the order the family's
    /// labels were given.
    pub fn with_label_values<'a>(&'a self, values: &'a [&'a str]) -> Series<'a> {
        Series {
            family: self,
            values,
        }
    }
}

impl Series<'_> {
    /// The series' value, replacing any before.
    pub fn set(self, v: impl Into<Value>) {
        let v = v.into();
        self.update(|slot| *slot = v);
    }

    /// Adds to the series' count: several rows of a snapshot can share one
    /// label set (protocols other than TCP, UDP and ICMP are all `other`),
    /// and a counter must be their sum, never the last of them.
    pub fn add(self, n: u64) {
        self.update(|slot| {
            *slot = match *slot {
                Value::Uint(u) => Value::Uint(u.saturating_add(n)),
                _ => Value::Uint(n),
            }
        });
    }

    fn update(self, change: impl FnOnce(&mut Value)) {
        let mut f = self.family.0.borrow_mut();
        if self.values.len() != f.labels.len() {
            let want = f.labels.len();
            f.misuse.get_or_insert((self.values.len(), want));
            return;
        }
        let mut key = vec![String::new(); self.values.len()];
        for (v, &at) in self.values.iter().zip(&f.order) {
            key[at] = (*v).to_string();
        }
        change(f.series.entry(key).or_insert(Value::Uint(0)));
    }
}

/// The families of one exposition, in the order they were registered.
#[derive(Default)]
pub struct Families(RefCell<Vec<FamilyHandle>>);

impl Families {
    pub fn register(
        &self,
        kind: Kind,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<FamilyHandle> {
        if !valid_name(name, true) {
            return Err(Error::Name(name.into()));
        }
        if let Some(bad) = labels.iter().find(|l| !valid_name(l, false)) {
            return Err(Error::Label {
                family: name.into(),
                label: (*bad).into(),
            });
        }
        if self.0.borrow().iter().any(|f| f.0.borrow().name == name) {
            return Err(Error::Duplicate(name.into()));
        }
        if help.is_empty() {
            return Err(Error::Help(name.into()));
        }
        let mut sorted: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        sorted.sort();
        if let Some(twice) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Label {
                family: name.into(),
                label: twice[0].clone(),
            });
        }
        let order = labels
            .iter()
            .map(|l| sorted.iter().position(|s| s == l).unwrap_or_default())
            .collect();
        let family = FamilyHandle(Rc::new(RefCell::new(Family {
            name: name.into(),
            help: help.into(),
            kind,
            labels: sorted,
            order,
            series: BTreeMap::new(),
            misuse: None,
        })));
        self.0.borrow_mut().push(family.clone());
        Ok(family)
    }

    /// The exposition text: families by name, each with its HELP and TYPE,
    /// then its series.
    pub fn render(&self) -> Result<String> {
        let families = self.0.borrow();
        let mut by_name: Vec<_> = families.iter().map(|f| f.0.borrow()).collect();
        by_name.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = String::with_capacity(16 * 1024);
        for f in by_name {
            if let Some((got, want)) = f.misuse {
                return Err(Error::Arity {
                    family: f.name.clone(),
                    got,
                    want,
                });
            }
            if f.series.is_empty() {
                continue;
            }
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape(&f.help, false));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (values, v) in &f.series {
                out.push_str(&f.name);
                if !values.is_empty() {
                    out.push('{');
                    for (i, (label, value)) in f.labels.iter().zip(values).enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{label}=\"{}\"", escape(value, true));
                    }
                    out.push('}');
                }
                out.push(' ');
                match *v {
                    Value::Int(i) => {
                        let _ = write!(out, "{i}");
                    }
                    Value::Uint(u) => {
                        let _ = write!(out, "{u}");
                    }
                    Value::Float(x) if x.is_nan() => out.push_str("NaN"),
                    Value::Float(x) if x == f64::INFINITY => out.push_str("+Inf"),
                    Value::Float(x) if x == f64::NEG_INFINITY => out.push_str("-Inf"),
                    Value::Float(x) => {
                        let _ = write!(out, "{x}");
                    }
                }
                out.push('\n');
            }
        }
        Ok(out)
    }
}

/// Metric names may also hold colons; label names may not, nor start with
/// `__` (reserved for Prometheus itself).
fn valid_name(name: &str, metric: bool) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (metric && c == ':'));
    first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':'))
        && (metric || !name.starts_with("__"))
}

/// HELP text escapes backslash and newline; label values also the double
/// quote.
fn escape(s: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '\n']) && !(quote && s.contains('"')) {
        return s.into();
    }
    let mut e = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => e.push_str("\\\\"),
            '\n' => e.push_str("\\n"),
            '"' if quote => e.push_str("\\\""),
            c => e.push(c),
        }
    }
    e.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_labels_and_series_come_out_sorted_and_escaped() {
        let f = Families::default();
        let g = f
            .register(Kind::Gauge, "z_gauge", "Last.", &["zone", "app"])
            .unwrap();
        let c = f
            .register(
                Kind::Counter,
                "a_total",
                "Back\\slash\nand \"quotes\".",
                &[],
            )
            .unwrap();
        f.register(Kind::Gauge, "m_empty", "Never set.", &["x"])
            .unwrap();
        g.with_label_values(&["b", "web"]).set(2_i64);
        g.with_label_values(&["a", "say \"hi\"\n\\"]).set(1.5);
        g.with_label_values(&["a", "db"]).set(f64::INFINITY);
        c.with_label_values(&[]).set(u64::MAX);
        assert_eq!(
            f.render().unwrap(),
            "# HELP a_total Back\\\\slash\\nand \"quotes\".\n\
             # TYPE a_total counter\n\
             a_total 18446744073709551615\n\
             # HELP z_gauge Last.\n\
             # TYPE z_gauge gauge\n\
             z_gauge{app=\"db\",zone=\"a\"} +Inf\n\
             z_gauge{app=\"say \\\"hi\\\"\\n\\\\\",zone=\"a\"} 1.5\n\
             z_gauge{app=\"web\",zone=\"b\"} 2\n"
        );
    }

    /// Four labels given in an order whose sort is a true cycle: values
    /// must follow their names, whatever the order.
    #[test]
    fn values_follow_their_label_names() {
        let f = Families::default();
        let c = f
            .register(
                Kind::Counter,
                "drops_total",
                "Drops.",
                &["netns", "service_name", "cause", "proto"],
            )
            .unwrap();
        c.with_label_values(&["1", "ssh", "table_full", "tcp"])
            .add(2);
        // Two rows sharing a label set (two protocols both `other`) sum.
        c.with_label_values(&["2", "other", "rule", "other"]).add(3);
        c.with_label_values(&["2", "other", "rule", "other"]).add(4);
        assert_eq!(
            f.render().unwrap(),
            "# HELP drops_total Drops.\n\
             # TYPE drops_total counter\n\
             drops_total{cause=\"rule\",netns=\"2\",proto=\"other\",service_name=\"other\"} 7\n\
             drops_total{cause=\"table_full\",netns=\"1\",proto=\"tcp\",service_name=\"ssh\"} 2\n"
        );
    }

    #[test]
    fn misuse_is_an_error_never_a_panic() {
        let f = Families::default();
        assert!(f.register(Kind::Gauge, "1bad", "h", &[]).is_err());
        assert!(f.register(Kind::Gauge, "ok", "h", &["__x"]).is_err());
        assert!(f.register(Kind::Gauge, "ok", "h", &["a-b"]).is_err());
        assert!(
            f.register(Kind::Gauge, "ok", "h", &["a", "b", "a"])
                .is_err()
        );
        assert!(f.register(Kind::Gauge, "ok", "", &["a"]).is_err());
        let g = f.register(Kind::Gauge, "ok", "h", &["a"]).unwrap();
        assert!(f.register(Kind::Counter, "ok", "h", &[]).is_err());
        g.with_label_values(&["1", "2"]).set(1_i64);
        assert!(matches!(
            f.render(),
            Err(Error::Arity {
                got: 2,
                want: 1,
                ..
            })
        ));
    }
}
