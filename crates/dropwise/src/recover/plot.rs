//! A recovery run's curves as one SVG file: training loss and held-out KL against training
//! tokens, side by side (a picture says at once whether the run was still improving).

use super::RecoverReport;

/// One panel: `points` (x, y) as a polyline with its axis ranges written at the corners.
fn panel(title: &str, x_label: &str, points: &[(f64, f64)], left: f64, color: &str) -> String {
    let (w, h, pad) = (420.0, 260.0, 40.0);
    let finite: Vec<(f64, f64)> = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let (x0, x1) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(x, _)| (a.min(x), b.max(x)));
    let (y0, y1) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, y)| (a.min(y), b.max(y)));
    let (y0, y1) = if finite.is_empty() { (0.0, 1.0) } else { (y0.min(0.0), y1.max(y0 + 1e-9)) };
    let (x0, x1) = if finite.is_empty() { (0.0, 1.0) } else { (x0, x1.max(x0 + 1e-9)) };
    let sx = |x: f64| left + pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let line: Vec<String> = finite.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    let dots: String = if finite.len() <= 40 {
        finite.iter().map(|&(x, y)| format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\"/>", sx(x), sy(y))).collect()
    } else {
        String::new()
    };
    format!(
        "<text x=\"{tx}\" y=\"18\" font-size=\"14\">{title}</text>\
<rect x=\"{rx}\" y=\"{pad}\" width=\"{rw}\" height=\"{rh}\" fill=\"none\" stroke=\"#ccc\"/>\
<text x=\"{rx}\" y=\"{yb}\" font-size=\"11\">{x0:.0}</text><text x=\"{xr}\" y=\"{yb}\" font-size=\"11\" text-anchor=\"end\">{x1:.0} {x_label}</text>\
<text x=\"{tl}\" y=\"{ytop}\" font-size=\"11\">{y1:.3}</text><text x=\"{tl}\" y=\"{ybot}\" font-size=\"11\">{y0:.3}</text>\
<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/><g fill=\"{color}\">{dots}</g>",
        tx = left + pad,
        rx = left + pad,
        rw = w - 2.0 * pad,
        rh = h - 2.0 * pad,
        yb = h - pad + 14.0,
        xr = left + w - pad,
        tl = left + 2.0,
        ytop = pad - 4.0,
        ybot = h - pad - 2.0,
        pts = line.join(" "),
    )
}

/// The SVG document: loss per update and held-out KL, both against tokens seen.
pub fn curves_svg(report: &RecoverReport, title: &str) -> String {
    let title = title.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let loss: Vec<(f64, f64)> = report.steps.iter().map(|s| (s.tokens as f64, s.loss)).collect();
    let kl: Vec<(f64, f64)> = report.evals.iter().map(|e| (e.tokens as f64, e.kl_divergence)).collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"290\" viewBox=\"0 0 860 290\" font-family=\"sans-serif\">\
<title>{title}</title>{}{}<text x=\"20\" y=\"284\" font-size=\"11\" fill=\"#555\">{title}</text></svg>\n",
        panel("training loss", "tokens", &loss, 0.0, "#1f77b4"),
        panel("held-out KL to the teacher", "tokens", &kl, 430.0, "#d62728"),
    )
}
