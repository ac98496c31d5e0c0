//! One HTML page per run: the recipe, a table per step, the per-layer choices across depth,
//! and quality against size and measured speed. Self-contained (inline SVG, no scripts, nothing
//! fetched at view time).

use std::fmt::Write as _;

use super::run::RunReport;

/// A point of a scatter plot: x, y and its label.
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub label: String,
}

/// HTML text with `<`, `>`, `&` and quotes escaped.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A labelled scatter plot as an SVG fragment (axes from the data's range, 0 included on y).
pub fn svg_scatter(title: &str, xlabel: &str, ylabel: &str, points: &[Point]) -> String {
    let (w, h, pad) = (520.0, 260.0, 50.0);
    let pts: Vec<&Point> = points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()).collect();
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (0.0f64, f64::NEG_INFINITY);
    for p in &pts {
        x0 = x0.min(p.x);
        x1 = x1.max(p.x);
        y0 = y0.min(p.y);
        y1 = y1.max(p.y);
    }
    if !x0.is_finite() {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    // A margin so the extreme points sit inside the frame.
    let dx = ((x1 - x0) * 0.1).max(1e-9 + x1.abs() * 0.05);
    let (x0, x1) = (x0 - dx, x1 + dx);
    let y1 = y1 + ((y1 - y0) * 0.1).max(1e-9);
    let x = |v: f64| pad + (w - 2.0 * pad) * (v - x0) / (x1 - x0);
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - y0) / (y1 - y0);
    let mut dots = String::new();
    for p in &pts {
        let _ = write!(
            dots,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#1f77b4\"><title>{}: {:.4}, {:.4}</title></circle>\
<text x=\"{:.1}\" y=\"{:.1}\" font-family=\"sans-serif\" font-size=\"10\">{}</text>",
            x(p.x),
            y(p.y),
            escape(&p.label),
            p.x,
            p.y,
            x(p.x) + 6.0,
            y(p.y) - 6.0,
            escape(&p.label)
        );
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
<text x=\"{pad}\" y=\"20\" font-family=\"sans-serif\" font-size=\"14\">{t}</text>\
<line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#888\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#888\"/>\
<text x=\"{pad}\" y=\"{lb}\" font-family=\"sans-serif\" font-size=\"10\">{x0:.3}</text>\
<text x=\"{rl}\" y=\"{lb}\" font-family=\"sans-serif\" font-size=\"10\">{x1:.3}</text>\
<text x=\"{mid}\" y=\"{xl}\" font-family=\"sans-serif\" font-size=\"11\" text-anchor=\"middle\">{xlabel}</text>\
<text x=\"4\" y=\"{ty}\" font-family=\"sans-serif\" font-size=\"10\">{y1:.3}</text><text x=\"4\" y=\"{b}\" font-family=\"sans-serif\" font-size=\"10\">{y0:.3}</text>\
<text x=\"12\" y=\"{ym}\" font-family=\"sans-serif\" font-size=\"11\" transform=\"rotate(-90 12 {ym})\" text-anchor=\"middle\">{ylabel}</text>{dots}</svg>",
        t = escape(title),
        xlabel = escape(xlabel),
        ylabel = escape(ylabel),
        b = h - pad,
        r = w - pad,
        lb = h - pad + 14.0,
        xl = h - pad + 30.0,
        rl = w - pad - 40.0,
        mid = w / 2.0,
        ty = pad + 4.0,
        ym = h / 2.0,
    )
}

/// The lines of a step's short table as HTML: `label  value` lines (the label padded to 22
/// columns) as table rows, anything else as preformatted text.
fn lines_html(lines: &[String]) -> String {
    let mut rows = String::new();
    let mut pre = String::new();
    for l in lines {
        // A label: a word or words (no figures) padded to 22 columns.
        let label = l.get(..22).filter(|label| {
            let t = label.trim_end();
            l.len() > 23 && t.len() <= 20 && t.starts_with(|c: char| c.is_alphabetic()) && !t.contains(|c: char| c.is_ascii_digit()) && l.as_bytes()[22] == b' '
        });
        match label {
            Some(label) => {
                let _ = write!(rows, "<tr><th>{}</th><td>{}</td></tr>", escape(label.trim()), escape(l[23..].trim()));
            }
            None => {
                pre.push_str(&escape(l));
                pre.push('\n');
            }
        }
    }
    let mut out = format!("<table>{rows}</table>");
    if !pre.is_empty() {
        let _ = write!(out, "<pre>{pre}</pre>");
    }
    out
}

/// The page for `run`, which read `model` and wrote `output`.
pub fn html(run: &RunReport, model: &str, output: &str) -> String {
    let (dense, after) = (&run.session.dense, &run.session.loaded.model);
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>dropwise run</h1><p>model: {}<br>output: {} ({:.1} MB)<br>parameters {} → {}; load {:.1}s, steps {:.1}s, write {:.1}s, total {:.1}s</p>",
        escape(model),
        escape(output),
        run.written.file_bytes as f64 / 1e6,
        dense.param_count(),
        after.param_count(),
        run.load_seconds,
        run.step_seconds.iter().sum::<f64>(),
        run.write_seconds,
        run.total_seconds
    );
    if let Some((w, d)) = &run.evaluation {
        let dense_bytes = dense.param_count() as f64 * 4.0;
        let _ = write!(
            body,
            "<h2>Result</h2><table><tr><th></th><th>perplexity</th><th>KL to the start</th><th>top-1 agreement</th><th>tokens/s (measured)</th><th>size MB</th></tr>\
<tr><th>start (f32)</th><td>{:.3}</td><td>0</td><td>1</td><td>{:.1}</td><td>{:.1}</td></tr>\
<tr><th>written</th><td>{:.3}</td><td>{:.4}</td><td>{:.4}</td><td>{:.1}</td><td>{:.1}</td></tr></table><p>{} windows × {} tokens.</p>",
            d.perplexity,
            d.tokens_per_second,
            dense_bytes / 1e6,
            w.perplexity,
            w.kl_divergence.unwrap_or(f64::NAN),
            w.top1_agreement.unwrap_or(f64::NAN),
            w.tokens_per_second,
            run.written.file_bytes as f64 / 1e6,
            w.windows,
            w.seq_len
        );
        let pts = |xs: [f64; 2]| vec![Point { x: xs[0], y: d.perplexity, label: "start".into() }, Point { x: xs[1], y: w.perplexity, label: "written".into() }];
        body.push_str(&svg_scatter("quality against size", "size (MB)", "perplexity", &pts([dense_bytes / 1e6, run.written.file_bytes as f64 / 1e6])));
        body.push_str(&svg_scatter("quality against measured speed", "tokens/s", "perplexity", &pts([d.tokens_per_second, w.tokens_per_second])));
    }
    for (i, ((kind, rep), secs)) in run.steps.iter().zip(&run.step_seconds).enumerate() {
        let _ = write!(body, "<h2>Step {} — {} ({secs:.1}s)</h2>{}", i + 1, escape(kind), lines_html(&rep.lines));
        for (title, values) in &rep.per_layer {
            body.push_str(&crate::analyze::svg_chart(&escape(title), values));
        }
    }
    let _ = write!(body, "<h2>Recipe</h2><pre>{}</pre>", escape(&run.recipe));
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>dropwise run: {}</title>\
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} svg{{margin:0.5em;border:1px solid #eee}} td,th{{padding:2px 8px;text-align:left}} pre{{background:#f6f6f6;padding:0.5em}}</style></head><body>{body}</body></html>",
        escape(model)
    )
}
