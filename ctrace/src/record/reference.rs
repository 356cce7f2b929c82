//! docs/records.md, generated from the record types' JSON schema (their
//! serde shape and doc comments), so the reference cannot drift from what
//! ctrace writes. A test compares the file with what the types give;
//! `CTRACE_BLESS=1` rewrites it.
use std::fmt::Write as _;

use serde_json::Value;

use super::Line;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/records.md");

/// The reference page for the schema of [`Line`].
fn render() -> String {
    let schema = serde_json::to_value(schemars::schema_for!(Line)).unwrap();
    let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
    let mut out = String::from(
        "# Record reference\n\n\
         <!-- Generated from the record types (ctrace/src/record.rs) by \
         `CTRACE_BLESS=1 cargo test -p ctrace --lib record::reference`; do not edit. -->\n\n\
         Every line ctrace writes with `--json`, into a recording (`--record`), \
         or for `status --json` and `probe --json`, is one JSON object whose \
         `type` says which record it is. `report` reads recordings back through \
         the same types. Fields are only ever added; a field a recording lacks \
         reads as empty. [output.md](output.md#json-output) explains what the \
         numbers mean.\n\n## Records\n\n",
    );
    for variant in schema["oneOf"].as_array().into_iter().flatten() {
        let tag = variant["properties"]["type"]["const"]
            .as_str()
            .unwrap_or("?");
        let _ = writeln!(out, "### `{tag}`\n");
        if let Some(d) = variant["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        // A record whose fields are a type of their own points to it.
        match variant.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.rsplit('/').next().unwrap_or(r);
                let _ = writeln!(out, "The fields of [{name}](#{}).\n", name.to_lowercase());
            }
            None => fields(&mut out, variant, &["type"]),
        }
    }
    out.push_str("## Types\n\n");
    for (name, def) in &defs {
        let _ = writeln!(out, "### {name}\n");
        if let Some(d) = def["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        if def.get("properties").is_some() {
            fields(&mut out, def, &[]);
        } else {
            let _ = writeln!(out, "{}\n", type_of(def));
        }
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

/// A table of an object schema's fields, but those in `skip`.
fn fields(out: &mut String, object: &Value, skip: &[&str]) {
    let required: Vec<&str> = object["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let _ = writeln!(out, "| field | type | |\n|---|---|---|");
    for (name, field) in object["properties"].as_object().into_iter().flatten() {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let mut about = field["description"]
            .as_str()
            .map(one_line)
            .unwrap_or_default();
        if !required.contains(&name.as_str()) {
            about = format!("{about} (may be absent)").trim_start().to_string();
        }
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} |",
            type_of(field),
            about.replace('|', "\\|")
        );
    }
    out.push('\n');
}

/// A schema's type in words, with links to the types it names.
fn type_of(s: &Value) -> String {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(c) = s.get("const") {
        return format!("`{c}`");
    }
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        let v: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
        return format!("one of {}", v.join(", "));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            let v: Vec<String> = alts.iter().map(type_of).collect();
            return v.join(" or ");
        }
    }
    match &s["type"] {
        Value::Array(types) => types
            .iter()
            .map(|t| simple(t.as_str().unwrap_or("?"), s))
            .collect::<Vec<_>>()
            .join(" or "),
        Value::String(t) => simple(t, s),
        _ => "any".to_string(),
    }
}

fn simple(t: &str, s: &Value) -> String {
    match t {
        "array" => format!("array of {}", type_of(&s["items"])),
        "object" => match s.get("additionalProperties") {
            Some(v) if v.is_object() => format!("object of {}", type_of(v)),
            _ => "object".to_string(),
        },
        "integer" => "integer".to_string(),
        "number" => "number".to_string(),
        "null" => "null".to_string(),
        other => other.to_string(),
    }
}

/// Doc comments wrap; a table cell cannot.
fn one_line(d: &str) -> String {
    d.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn records_md_is_what_the_types_say() {
    let want = render();
    if std::env::var_os("CTRACE_BLESS").is_some() {
        std::fs::write(PATH, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(PATH).unwrap_or_default();
    assert!(
        have == want,
        "docs/records.md is not what the record types say: run \
         `CTRACE_BLESS=1 cargo test -p ctrace --lib record::reference` and commit it"
    );
}
