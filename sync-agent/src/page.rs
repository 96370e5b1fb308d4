//! `GET /`: the status as a page for people: per folder its role, epoch,
//! peer, connection, lag with an inline SVG chart of the last hour, last
//! applied round, held databases, last error and handover. Server-rendered
//! HTML and CSS, no script; it reloads itself every five seconds.

use crate::continuous::FolderStatus;
use crate::control::Status;
use crate::surface::Shared;
use std::fmt::Write as _;

/// HTML-escapes `s`.
#[must_use]
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:1.5em;background:#f6f7f9;color:#1d2330}\
h1{font-size:1.3em}section{background:#fff;border:1px solid #d8dce3;border-radius:8px;padding:1em;margin:1em 0;max-width:56em}\
h2{margin:0 0 .5em;font-size:1.15em}.ok{color:#17803d}.bad{color:#b42318}table{border-collapse:collapse}\
td{padding:.15em 1em .15em 0;vertical-align:top}td:first-child{color:#5b6270}code{font-size:.9em;word-break:break-all}\
svg{background:#fbfcfd;border:1px solid #e4e7ec;margin-top:.5em}";

/// The page for `status`.
#[must_use]
pub fn render(status: &Status, shared: &Shared) -> String {
    let history = shared.history.lock().map(|h| h.clone()).unwrap_or_default();
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>understudy</title><style>{STYLE}</style></head><body>\
         <h1>understudy · node <code>{}</code></h1>",
        esc(&status.node)
    );
    if status.folders.is_empty() {
        s.push_str("<p>No folder runs on this node.</p>");
    }
    for f in &status.folders {
        let bound = shared.max_lag(&f.folder);
        let samples: Vec<(f64, f64)> = history
            .get(&f.folder)
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        folder(&mut s, status, f, bound, &samples);
    }
    s.push_str("</body></html>\n");
    s
}

fn folder(s: &mut String, status: &Status, f: &FolderStatus, bound: f64, samples: &[(f64, f64)]) {
    let problems = crate::lag::check(std::slice::from_ref(f), bound);
    let state = if problems.is_empty() {
        "<span class=ok>healthy</span>".to_string()
    } else {
        let why: Vec<String> = problems.iter().map(|p| esc(&p.what)).collect();
        format!("<span class=bad>unhealthy: {}</span>", why.join("; "))
    };
    let _ = write!(
        s,
        "<section><h2>{} <small>({})</small></h2><p>{state}</p><table>",
        esc(&f.folder),
        esc(&f.role)
    );
    let mut row = |k: &str, v: String| {
        let _ = write!(s, "<tr><td>{k}</td><td>{v}</td></tr>");
    };
    row("epoch", f.epoch.to_string());
    row("peer", format!("<code>{}</code>", esc(&f.peer)));
    row("connected", if f.connected { "yes" } else { "no" }.into());
    if f.role == "source" {
        row(
            "lag",
            format!(
                "{:.1} s (bound {bound} s), {} entries pending",
                f.lag_s, f.files_pending
            ),
        );
        row(
            "rounds",
            format!(
                "{} applied ({} full), {} failed",
                f.rounds, f.full_rounds, f.rounds_failed
            ),
        );
    } else {
        row(
            "rounds applied",
            format!("{} ({} full)", f.rounds, f.full_rounds),
        );
    }
    if let Some(t) = f.last_applied_unix {
        row("last applied", crate::alerts::rfc3339(t));
    }
    if !f.root_hash.is_empty() {
        row("root hash", format!("<code>{}</code>", esc(&f.root_hash)));
    }
    if !f.held_databases.is_empty() {
        row("held databases", esc(&f.held_databases.join(", ")));
    }
    if let Some(e) = &f.last_error {
        row("last error", esc(e));
    }
    if let Some(h) = status.handovers.iter().find(|h| h.folder == f.folder) {
        row(
            "handover",
            format!("{} at step {}", esc(&h.kind), esc(&h.step)),
        );
    }
    s.push_str("</table>");
    if f.role == "source" {
        chart(s, samples, bound);
    }
    s.push_str("</section>");
}

/// An SVG line of `samples` (unix seconds, lag seconds) over the last hour,
/// with the bound as a dashed line.
pub fn chart(s: &mut String, samples: &[(f64, f64)], bound: f64) {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    let Some(&(end, _)) = samples.last() else {
        s.push_str("<p>No lag samples yet.</p>");
        return;
    };
    let start = end - 3600.0;
    let top = samples
        .iter()
        .map(|(_, l)| *l)
        .fold(bound * 1.25, f64::max)
        .max(1.0);
    let y = |l: f64| H - l / top * H;
    let pts: Vec<String> = samples
        .iter()
        .filter(|(t, _)| *t >= start)
        .map(|(t, l)| format!("{:.1},{:.1}", (t - start) / 3600.0 * W, y(*l)))
        .collect();
    let _ = write!(
        s,
        "<svg width={W} height={H} viewBox=\"0 0 {W} {H}\" role=img aria-label=\"lag over the last hour\">\
         <line x1=0 x2={W} y1={b:.1} y2={b:.1} stroke=#b42318 stroke-dasharray=4></line>\
         <polyline fill=none stroke=#2563eb stroke-width=2 points=\"{}\"></polyline>\
         <text x=4 y=14 font-size=11>{top:.1} s</text><text x={r} y={t:.1} font-size=11 fill=#b42318 text-anchor=end>bound {bound} s</text></svg>\
         <div><small>lag over the last hour (one sample per 10 s)</small></div>",
        pts.join(" "),
        b = y(bound),
        t = (y(bound) - 3.0).max(12.0),
        r = W - 4.0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_the_chart_spans_the_last_hour() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let mut s = String::new();
        // Two hours of samples: only the last hour is drawn, the newest at the right.
        let samples: Vec<(f64, f64)> = (0..720).map(|i| (f64::from(i) * 10.0, 1.0)).collect();
        chart(&mut s, &samples, 30.0);
        let points = s
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap_or_default();
        assert_eq!(points.split(' ').count(), 361, "{s}");
        assert!(points.ends_with("600.0,116.8"), "{points}");
        let mut empty = String::new();
        chart(&mut empty, &[], 30.0);
        assert!(empty.contains("No lag samples yet"));
    }
}
