//! One HTML page per run: the recipe, a table per step, the per-layer choices across depth,
//! and quality against size and measured speed. Self-contained (inline SVG, no scripts, nothing
//! fetched at view time).

use std::fmt::Write as _;

use super::fit::FitReport;
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
    scatter(title, xlabel, ylabel, points, false)
}

/// A scatter plot of predicted (x) against measured (y) with the line y = x: points above it
/// were worse than predicted.
pub fn svg_scatter_diagonal(title: &str, xlabel: &str, ylabel: &str, points: &[Point]) -> String {
    scatter(title, xlabel, ylabel, points, true)
}

fn scatter(title: &str, xlabel: &str, ylabel: &str, points: &[Point], diagonal: bool) -> String {
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
    let (lo, hi) = (x0.max(y0), x1.min(y1));
    if diagonal && lo < hi {
        let _ = write!(dots, "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#bbb\" stroke-dasharray=\"4 3\"/>", x(lo), y(lo), x(hi), y(hi));
    }
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

/// The page for a `fit` run on `model`: the budget, the single-step costs, the checked
/// candidates (predicted and measured), predicted against measured KL, size against KL, and
/// the predicted front.
pub fn fit_html(r: &FitReport, model: &str, output: Option<&str>) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>dropwise fit</h1><p>model: {} ({:.1} MB, {:.1} tokens/s as stored)<br>target: {}<br>output: {}<br>{} candidates searched; costs {} ({:.1}s); total {:.1}s; checks on {} windows (start perplexity {:.3})</p>",
        escape(model),
        mb(r.costs.start_bytes),
        r.costs.start_tokens_per_second,
        escape(&format!("{:?}", r.target)),
        escape(output.unwrap_or("none (dry run)")),
        r.candidates,
        if r.costs_reused { "read from the costs file" } else { "measured" },
        r.costs.seconds,
        r.seconds,
        r.check_windows,
        r.start_perplexity
    );
    body.push_str("<h2>Checked candidates</h2><table><tr><th></th><th>family</th><th>blocks dropped</th><th>neurons</th><th>bpw</th><th>embedding</th><th>predicted KL</th><th>measured KL</th><th>perplexity</th><th>predicted MB</th><th>measured MB</th><th>predicted ×</th><th>measured ×</th></tr>");
    for (i, c) in r.checked.iter().enumerate() {
        let m = c.measured.as_ref();
        let f = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into());
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{:?}</td><td>{:.1} %</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.2}</td><td>{}</td></tr>",
            if r.chosen == Some(i) { "chosen" } else { "" },
            c.label(),
            c.blocks,
            100.0 * c.neurons,
            c.bpw.map(|b| b.to_string()).unwrap_or_else(|| "as stored".into()),
            escape(c.embed.as_deref().unwrap_or("as stored")),
            c.predicted_kl,
            f(m.map(|m| m.kl), 4),
            f(m.map(|m| m.perplexity), 3),
            mb(c.predicted_bytes),
            f(m.map(|m| mb(m.bytes)), 1),
            c.predicted_speedup,
            f(m.map(|m| m.speedup), 2),
        );
    }
    body.push_str("</table>");
    let label = |c: &super::fit::Candidate| format!("{} d{} n{:.0}% {}", c.label(), c.blocks.len(), 100.0 * c.neurons, c.bpw.map(|b| b.to_string()).unwrap_or_default());
    let measured: Vec<(&super::fit::Candidate, &super::fit::Measured)> = r.checked.iter().filter_map(|c| c.measured.as_ref().map(|m| (c, m))).collect();
    let kl_points: Vec<Point> = measured.iter().map(|(c, m)| Point { x: c.predicted_kl, y: m.kl, label: label(c) }).collect();
    body.push_str(&svg_scatter_diagonal("KL: predicted (calibration windows) against measured (check windows)", "predicted KL", "measured KL", &kl_points));
    let size_points: Vec<Point> = measured.iter().map(|(c, m)| Point { x: mb(m.bytes), y: m.kl, label: label(c) }).collect();
    body.push_str(&svg_scatter("measured KL against size", "size (MB)", "KL", &size_points));
    let speed_points: Vec<Point> = measured.iter().map(|(c, m)| Point { x: m.speedup, y: m.kl, label: label(c) }).collect();
    body.push_str(&svg_scatter("measured KL against measured speedup", "speedup", "KL", &speed_points));
    let front_points: Vec<Point> = r.front.iter().map(|c| Point { x: mb(c.predicted_bytes), y: c.predicted_kl, label: String::new() }).collect();
    body.push_str(&svg_scatter("predicted front: KL against size", "size (MB)", "predicted KL", &front_points));
    body.push_str("<h2>Single-step costs (calibration windows)</h2><table><tr><th>bpw</th><th>KL</th><th>MB</th><th>speedup</th></tr>");
    for b in &r.costs.bits {
        let _ = write!(body, "<tr><td>{}</td><td>{:.4}</td><td>{:.1}</td><td>{:.2}</td></tr>", b.bpw, b.kl, mb(b.bytes), b.speedup);
    }
    body.push_str("</table><table><tr><th>embedding</th><th>written as</th><th>KL</th><th>MB</th></tr>");
    for e in &r.costs.embed {
        let _ = write!(body, "<tr><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.1}</td></tr>", escape(&e.asked), escape(&e.written), e.kl, mb(e.bytes));
    }
    body.push_str("</table><table><tr><th>neurons</th><th>KL</th></tr>");
    for (f, kl) in r.costs.neuron_kl.iter().skip(1) {
        let _ = write!(body, "<tr><td>{:.1} %</td><td>{kl:.4}</td></tr>", 100.0 * f);
    }
    body.push_str("</table>");
    let block: Vec<f64> = r.costs.block_kl.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    if block.iter().any(|v| v.is_finite()) {
        body.push_str(&crate::analyze::svg_chart("single-block removal KL", &block));
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>dropwise fit: {}</title>\
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}} svg{{margin:0.5em;border:1px solid #eee}} td,th{{padding:2px 8px;text-align:left}}</style></head><body>{body}</body></html>",
        escape(model)
    )
}
