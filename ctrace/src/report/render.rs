//! A report is a list of blocks, rendered as Markdown for a terminal or a
//! ticket, or as one self-contained HTML page (inline CSS and SVG plots,
//! nothing fetched) for a browser.
use std::fmt::Write as _;

pub enum Block {
    Heading(u8, String),
    Para(String),
    Bullets(Vec<String>),
    Table {
        head: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// A code block and its language (`sh`, `yaml`).
    Code(&'static str, String),
    Plot(Plot),
}

/// Lines over time: x in seconds since the recording's start.
pub struct Plot {
    pub title: String,
    pub y_label: String,
    /// Upper bound of the y axis; None: the data's maximum.
    pub y_max: Option<f64>,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Plot {
    fn y_top(&self) -> f64 {
        self.y_max.unwrap_or_else(|| {
            self.series
                .iter()
                .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
                .fold(0.0, f64::max)
                .max(1.0)
        })
    }

    fn x_end(&self) -> f64 {
        self.series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
            .fold(0.0, f64::max)
            .max(1.0)
    }

    /// One text line per series: an eight-level sparkline over 60 columns.
    fn sparklines(&self) -> String {
        const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
        const COLS: usize = 60;
        let (top, end) = (self.y_top(), self.x_end());
        let width = self.series.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (name, points) in &self.series {
            let mut cols = [f64::NAN; COLS];
            for (x, y) in points {
                let c = ((x / end) * (COLS - 1) as f64).round() as usize;
                let c = c.min(COLS - 1);
                cols[c] = if cols[c].is_nan() {
                    *y
                } else {
                    cols[c].max(*y)
                };
            }
            let line: String = cols
                .iter()
                .map(|y| {
                    if y.is_nan() {
                        ' '
                    } else {
                        LEVELS[((y / top) * 7.0).round().clamp(0.0, 7.0) as usize]
                    }
                })
                .collect();
            let peak = points.iter().map(|(_, y)| *y).fold(0.0, f64::max);
            let _ = writeln!(out, "{name:<width$} |{line}| peak {}", num(peak));
        }
        out
    }

    fn svg(&self) -> String {
        const W: f64 = 720.0;
        const H: f64 = 240.0;
        const L: f64 = 60.0;
        const B: f64 = 30.0;
        const COLORS: [&str; 8] = [
            "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        ];
        let (top, end) = (self.y_top(), self.x_end());
        let px = |x: f64| L + x / end * (W - L - 10.0);
        let py = |y: f64| (H - B) - y / top * (H - B - 10.0);
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="{t}">"#,
            h = H + 20.0 * self.series.len() as f64,
            t = esc(&self.title)
        );
        let _ = write!(
            s,
            r##"<rect x="{L}" y="10" width="{w}" height="{hh}" fill="#fafafa" stroke="#ccc"/>"##,
            w = W - L - 10.0,
            hh = H - B - 10.0
        );
        for i in 0..=4 {
            let y = top * f64::from(i) / 4.0;
            let _ = write!(
                s,
                r##"<line x1="{L}" x2="{x2}" y1="{yy}" y2="{yy}" stroke="#e5e5e5"/><text x="{tx}" y="{ty}" font-size="11" text-anchor="end">{v}</text>"##,
                x2 = W - 10.0,
                yy = py(y),
                tx = L - 4.0,
                ty = py(y) + 4.0,
                v = num(y)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{L}" y="{y}" font-size="11">0 s</text><text x="{x}" y="{y}" font-size="11" text-anchor="end">{e} s</text><text x="12" y="{my}" font-size="11" transform="rotate(-90 12 {my})" text-anchor="middle">{yl}</text>"#,
            y = H - B + 16.0,
            x = W - 10.0,
            e = num(end),
            my = H / 2.0,
            yl = esc(&self.y_label)
        );
        for (i, (name, points)) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let path: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            let ly = H + 20.0 * i as f64 + 4.0;
            let _ = write!(
                s,
                r#"<rect x="{L}" y="{ry}" width="14" height="4" fill="{c}"/><text x="{tx}" y="{ly}" font-size="12">{n}</text>"#,
                ry = ly - 6.0,
                tx = L + 20.0,
                n = esc(name)
            );
        }
        s.push_str("</svg>");
        s
    }
}

/// Compact numbers for axes and sparklines.
fn num(v: f64) -> String {
    if v >= 10.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line's text without its Markdown escapes, for plain-text places
/// (the page title).
fn unescape(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek().is_some_and(char::is_ascii_punctuation) {
            out.push(chars.next().unwrap());
        } else {
            out.push(c);
        }
    }
    out
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

pub fn markdown(blocks: &[Block]) -> String {
    let mut out = String::new();
    for b in blocks {
        match b {
            Block::Heading(level, t) => {
                let _ = writeln!(out, "{} {t}\n", "#".repeat(usize::from(*level)));
            }
            Block::Para(t) => {
                let _ = writeln!(out, "{t}\n");
            }
            Block::Bullets(items) => {
                for i in items {
                    let _ = writeln!(out, "- {i}");
                }
                out.push('\n');
            }
            Block::Table { head, rows } => {
                let _ = writeln!(
                    out,
                    "| {} |",
                    head.iter()
                        .map(|h| md_cell(h))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
                let _ = writeln!(out, "|{}", " --- |".repeat(head.len()));
                for r in rows {
                    let _ = writeln!(
                        out,
                        "| {} |",
                        r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | ")
                    );
                }
                out.push('\n');
            }
            Block::Code(lang, t) => {
                let _ = writeln!(out, "```{lang}\n{}\n```\n", t.trim_end());
            }
            Block::Plot(p) => {
                let _ = writeln!(
                    out,
                    "**{}** ({}, max {}):\n\n```text\n{}```\n",
                    p.title,
                    p.y_label,
                    num(p.y_top()),
                    p.sparklines()
                );
            }
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f0f0f0}pre{background:#f6f8fa;padding:.8em;overflow-x:auto}h1{border-bottom:2px solid #d62728}\
code{background:#f6f8fa}";

pub fn html(title: &str, blocks: &[Block]) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(&unescape(title))
    );
    for b in blocks {
        match b {
            Block::Heading(level, t) => {
                let _ = writeln!(out, "<h{level}>{}</h{level}>", inline(t));
            }
            Block::Para(t) => {
                let _ = writeln!(out, "<p>{}</p>", inline(t));
            }
            Block::Bullets(items) => {
                out.push_str("<ul>");
                for i in items {
                    let _ = write!(out, "<li>{}</li>", inline(i));
                }
                out.push_str("</ul>\n");
            }
            Block::Table { head, rows } => {
                out.push_str("<table><tr>");
                for h in head {
                    let _ = write!(out, "<th>{}</th>", esc(h));
                }
                out.push_str("</tr>");
                for r in rows {
                    out.push_str("<tr>");
                    for c in r {
                        let _ = write!(out, "<td>{}</td>", inline(c));
                    }
                    out.push_str("</tr>");
                }
                out.push_str("</table>\n");
            }
            Block::Code(_, t) => {
                let _ = writeln!(out, "<pre><code>{}</code></pre>", esc(t.trim_end()));
            }
            Block::Plot(p) => {
                let _ = writeln!(out, "<h3>{}</h3>\n{}", esc(&p.title), p.svg());
            }
        }
    }
    out.push_str("</body></html>\n");
    out
}

/// Markdown's `code`, **bold** and backslash escapes (how text from a
/// recording is written, see crate::text::markdown) in a line, as HTML.
fn inline(t: &str) -> String {
    let mut out = String::new();
    let (mut code, mut bold) = (false, false);
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // CommonMark: a backslash escapes ASCII punctuation only, and
            // not inside a code span.
            '\\' if !code && chars.peek().is_some_and(char::is_ascii_punctuation) => {
                out.push_str(&esc(&chars.next().unwrap().to_string()));
            }
            '`' => {
                out.push_str(if code { "</code>" } else { "<code>" });
                code = !code;
            }
            '*' if !code && chars.peek() == Some(&'*') => {
                chars.next();
                out.push_str(if bold { "</strong>" } else { "<strong>" });
                bold = !bold;
            }
            c => out.push_str(&esc(&c.to_string())),
        }
    }
    // Close what a line left open, so that one line cannot style the page.
    if code {
        out.push_str("</code>");
    }
    if bold {
        out.push_str("</strong>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_self_contained() {
        let blocks = [
            Block::Heading(1, "a <b>".into()),
            Block::Para("run `sysctl -w x=1` **now**".into()),
            Block::Plot(Plot {
                title: "fill".into(),
                y_label: "%".into(),
                y_max: Some(100.0),
                series: vec![("ns".into(), vec![(0.0, 10.0), (5.0, 100.0)])],
            }),
        ];
        let h = html("t", &blocks);
        assert!(h.contains("<h1>a &lt;b&gt;</h1>"));
        assert!(h.contains("<code>sysctl -w x=1</code> <strong>now</strong>"));
        assert!(h.contains("<polyline"));
        // Nothing to fetch: the only URL is the SVG namespace.
        assert_eq!(
            h.matches("http").count(),
            h.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
        );
        assert!(!h.contains("<script") && !h.contains("src=") && !h.contains("<link"));
        let m = markdown(&blocks);
        assert!(m.contains("ns |") && m.contains('█'), "{m}");
    }
}
