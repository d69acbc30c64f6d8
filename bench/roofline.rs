//! The `kernels` table as a roofline chart (SVG, plotters): each op's achieved FLOP/s against its
//! arithmetic intensity, under this machine's memory and matrix ceilings measured in the run.

use std::path::Path;

use anyhow::{bail, Result};
use plotters::prelude::*;

/// One op of the table.
pub struct RooflinePoint {
    pub name: String,
    /// FLOPs per byte moved.
    pub intensity: f64,
    pub gflops: f64,
}

/// Writes the chart: the roof min(bandwidth · intensity, peak) and one labelled point per op
/// (ops without FLOPs have no place on it and are left out).
pub fn write_svg(
    path: &Path,
    title: &str,
    bandwidth_gbs: f64,
    peak_gflops: f64,
    points: &[RooflinePoint],
) -> Result<()> {
    let shown: Vec<&RooflinePoint> = points
        .iter()
        .filter(|p| p.intensity > 0.0 && p.gflops > 0.0)
        .collect();
    if shown.is_empty() || !(bandwidth_gbs > 0.0 && peak_gflops > 0.0) {
        bail!("nothing to chart");
    }
    let fold = |init: f64, f: fn(f64, f64) -> f64, v: &dyn Fn(&RooflinePoint) -> f64| {
        shown.iter().map(|p| v(p)).fold(init, f)
    };
    let ridge = peak_gflops / bandwidth_gbs;
    let x_min = fold(ridge, f64::min, &|p| p.intensity) / 2.0;
    let x_max = fold(ridge, f64::max, &|p| p.intensity) * 2.0;
    let y_min = fold(peak_gflops, f64::min, &|p| p.gflops) / 2.0;
    // Winograd convolutions do fewer FLOPs than the table counts, so they can sit above the roof.
    let y_max = fold(peak_gflops, f64::max, &|p| p.gflops) * 2.0;

    let root = SVGBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("arithmetic intensity (FLOP / byte)")
        .y_desc("achieved GFLOP/s")
        .draw()?;
    const SAMPLES: usize = 200;
    let roof = (0..=SAMPLES).map(|i| {
        let x = x_min * (x_max / x_min).powf(i as f64 / SAMPLES as f64);
        (x, (bandwidth_gbs * x).min(peak_gflops))
    });
    chart
        .draw_series(LineSeries::new(roof, BLUE.stroke_width(2)))?
        .label(format!(
            "roof: {bandwidth_gbs:.1} GB/s copy, {peak_gflops:.0} GFLOP/s GEMM"
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.draw_series(
        shown
            .iter()
            .map(|p| Circle::new((p.intensity, p.gflops), 4, RED.filled())),
    )?;
    chart.draw_series(shown.iter().map(|p| {
        Text::new(
            p.name.clone(),
            (p.intensity * 1.05, p.gflops),
            ("sans-serif", 10),
        )
    }))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
