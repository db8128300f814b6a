//! Saved MiB over time, one line per system, as SVG.

use std::path::Path;

use plotters::prelude::*;

use super::run::SystemResult;

/// Writes the plot.
pub fn plot(path: &Path, rs: &[SystemResult]) -> anyhow::Result<()> {
    let tmax = rs
        .iter()
        .flat_map(|r| r.timeline.last().map(|s| s.t))
        .fold(0.1f64, f64::max);
    let ymax = rs
        .iter()
        .flat_map(|r| {
            r.timeline
                .iter()
                .map(|s| s.measured.max(0) as f64 / (1u64 << 20) as f64)
        })
        .chain(
            rs.iter()
                .map(|r| r.achievable_bytes as f64 / (1u64 << 20) as f64),
        )
        .fold(1.0f64, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Saved memory over time (measured: Pss drop)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since merging started")
        .y_desc("saved MiB")
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, r) in rs.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                r.timeline
                    .iter()
                    .map(|s| (s.t, s.measured.max(0) as f64 / (1u64 << 20) as f64)),
                c.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(r.system.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        let a = r.achievable_bytes as f64 / (1u64 << 20) as f64;
        chart
            .draw_series(LineSeries::new(vec![(0.0, a), (tmax, a)], c.mix(0.3)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    Ok(())
}
