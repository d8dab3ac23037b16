//! Collected figures: the printed table, `bench/results.json` and `bench/results.svg`.

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde_json::{json, Value};
use std::{fmt::Write as _, path::Path};

/// One measured figure, as printed and as written to JSON.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Stable machine-readable name, e.g. `micro.per_call.ipip_hit`.
    pub key: String,
    pub label: String,
    pub value: f64,
    pub unit: &'static str,
    /// Ratio to a baseline (`value / baseline`, or `baseline / value` where more is better,
    /// as the `ratio_to` text says).
    pub ratio: Option<f64>,
    pub ratio_to: Option<String>,
    /// The target, as text, and whether it was met.
    pub target: Option<(String, bool)>,
    /// What the figure measures.
    pub measures: String,
}

impl Figure {
    pub fn new(key: &str, label: &str, value: f64, unit: &'static str, measures: &str) -> Self {
        Self {
            key: key.to_string(),
            label: label.to_string(),
            value,
            unit,
            ratio: None,
            ratio_to: None,
            target: None,
            measures: measures.to_string(),
        }
    }

    pub fn ratio(mut self, ratio: f64, to: &str) -> Self {
        self.ratio = Some(ratio);
        self.ratio_to = Some(to.to_string());
        self
    }

    pub fn target(mut self, text: &str, met: bool) -> Self {
        self.target = Some((text.to_string(), met));
        self
    }
}

/// A latency distribution to plot (microseconds, sorted).
pub struct Cdf {
    pub name: String,
    pub sorted_us: Vec<f64>,
}

#[derive(Default)]
pub struct Report {
    pub sections: Vec<(String, Vec<Figure>)>,
    pub notes: Vec<String>,
    /// Extra structured data for the JSON file.
    pub data: serde_json::Map<String, Value>,
    pub cdfs: Vec<Cdf>,
}

impl Report {
    pub fn section(&mut self, title: &str) -> &mut Vec<Figure> {
        if let Some(i) = self.sections.iter().position(|(t, _)| t == title) {
            return &mut self.sections[i].1;
        }
        self.sections.push((title.to_string(), Vec::new()));
        &mut self.sections.last_mut().expect("just pushed").1
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table, as plain text (also pasted into BENCHMARKS.md).
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (title, figures) in &self.sections {
            let _ = writeln!(out, "\n## {title}\n");
            let _ = writeln!(
                out,
                "| figure | value | ratio | target | what it measures |"
            );
            let _ = writeln!(out, "|---|---:|---|---|---|");
            for f in figures {
                let ratio = match (&f.ratio, &f.ratio_to) {
                    (Some(r), Some(to)) => format!("{r:.2}x {to}"),
                    _ => String::new(),
                };
                let target = match &f.target {
                    Some((text, true)) => format!("{text}: met"),
                    Some((text, false)) => format!("{text}: **MISSED**"),
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {} | {} | {} |",
                    f.label,
                    format_value(f.value),
                    f.unit,
                    ratio,
                    target,
                    f.measures
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nNotes:");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    pub fn json(&self, machine: Value) -> Value {
        let sections: Vec<Value> = self
            .sections
            .iter()
            .map(|(title, figures)| {
                json!({
                    "title": title,
                    "figures": figures.iter().map(|f| json!({
                        "key": f.key,
                        "label": f.label,
                        "value": f.value,
                        "unit": f.unit,
                        "ratio": f.ratio,
                        "ratio_to": f.ratio_to,
                        "target": f.target.as_ref().map(|(t, _)| t),
                        "target_met": f.target.as_ref().map(|(_, m)| m),
                        "measures": f.measures,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "machine": machine,
            "sections": sections,
            "notes": self.notes,
            "data": self.data,
        })
    }

    pub fn write(&self, dir: &Path, machine: Value) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json_path = dir.join("results.json");
        std::fs::write(
            &json_path,
            serde_json::to_string_pretty(&self.json(machine))? + "\n",
        )
        .with_context(|| format!("writing {}", json_path.display()))?;
        let svg_path = dir.join("results.svg");
        self.plot(&svg_path)
            .with_context(|| format!("drawing {}", svg_path.display()))?;
        println!("wrote {} and {}", json_path.display(), svg_path.display());
        Ok(())
    }

    /// Four panels: per-packet cost, packet rate, request latency CDFs, Maglev build time.
    fn plot(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((2, 2));
        let per_packet: Vec<(String, f64)> = ["micro.repeat.", "micro.per_call."]
            .iter()
            .flat_map(|prefix| self.figures_with(prefix))
            .map(|f| (f.label.clone(), f.value))
            .collect();
        bars(
            &panels[0],
            "Per-packet cost, BPF_PROG_TEST_RUN (ns)",
            &per_packet,
        )?;
        let pps: Vec<(String, f64)> = self
            .figures_with("pps.")
            .filter(|f| f.unit == "Mpps")
            .map(|f| (f.label.clone(), f.value))
            .collect();
        bars(&panels[1], "Packet rate, native XDP on veth (Mpps)", &pps)?;
        self.latency_panel(&panels[2])?;
        let maglev: Vec<(f64, f64)> = self
            .figures_with("control.maglev_n")
            .filter_map(|f| {
                let n: f64 = f.key.trim_start_matches("control.maglev_n").parse().ok()?;
                Some((n, f.value))
            })
            .collect();
        line_panel(
            &panels[3],
            "Maglev table build, M = 65537 (ms)",
            "backends (N)",
            &maglev,
        )?;
        root.present()?;
        Ok(())
    }

    fn figures_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Figure> + 'a {
        self.sections
            .iter()
            .flat_map(|(_, f)| f)
            .filter(move |f| f.key.starts_with(prefix))
    }

    fn latency_panel(&self, area: &DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()> {
        let max = self
            .cdfs
            .iter()
            .filter_map(|c| {
                // The p99.5 keeps one stray outlier from flattening the plot.
                c.sorted_us.get(c.sorted_us.len() * 995 / 1000).copied()
            })
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                "TCP request latency CDF (connect+request+close)",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..max * 1.05, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("latency (µs)")
            .y_desc("fraction")
            .draw()?;
        for (i, cdf) in self.cdfs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let n = cdf.sorted_us.len().max(1) as f64;
            let step = (cdf.sorted_us.len() / 500).max(1);
            let points: Vec<(f64, f64)> = cdf
                .sorted_us
                .iter()
                .enumerate()
                .step_by(step)
                .map(|(k, v)| (*v, (k + 1) as f64 / n))
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(cdf.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        Ok(())
    }
}

fn format_value(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Horizontal bars with their value written next to them.
fn bars(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    items: &[(String, f64)],
) -> Result<()> {
    let max = items
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let n = items.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..max * 1.6, 0.0..n as f64)?;
    chart.configure_mesh().disable_y_mesh().y_labels(0).draw()?;
    for (i, (label, value)) in items.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let color = Palette99::pick(i).to_rgba();
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.15), (*value, y + 0.85)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{label}: {}", format_value(*value)),
            (*value + max * 0.02, y + 0.7),
            ("sans-serif", 11),
        )))?;
    }
    Ok(())
}

fn line_panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    points: &[(f64, f64)],
) -> Result<()> {
    let max_x = points.iter().map(|p| p.0).fold(1.0f64, f64::max);
    let max_y = points.iter().map(|p| p.1).fold(1e-9f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d((1.0..max_x * 1.5).log_scale(), 0.0..max_y * 1.2)?;
    chart.configure_mesh().x_desc(x_desc).y_desc("ms").draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        BLUE.stroke_width(2),
    ))?;
    chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    for p in points {
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.2} ms", p.1),
            (p.0, p.1 + max_y * 0.05),
            ("sans-serif", 12),
        )))?;
    }
    Ok(())
}
