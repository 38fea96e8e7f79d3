//! The bench's bar chart: delivered packet rate per system, grouped by
//! direction and payload size. Text needs a TrueType font: DejaVu Sans is
//! read at run time if the machine has it (no build-time font dependency);
//! without it the chart has bars and no labels.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One group of bars (a direction and size); values in packets per second, one per series.
#[derive(Debug, Clone)]
pub struct Group {
    /// Label under the group.
    pub label: String,
    /// One value per series (None: not measured).
    pub values: Vec<Option<f64>>,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(150, 150, 150),
    RGBColor(60, 110, 200),
    RGBColor(230, 120, 30),
    RGBColor(60, 160, 80),
];

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Draws the chart to `path` (PNG).
pub fn draw(path: &Path, title: &str, series: &[&str], groups: &[Group]) -> anyhow::Result<()> {
    let text = register_font();
    let (width, height) = (1100i32, 600i32);
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).context("fill")?;
    let (left, right, top, bottom) = (80i32, 20i32, 70i32, 70i32);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let max = groups
        .iter()
        .flat_map(|g| g.values.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1.0);
    // A round axis maximum in Mpps.
    let step = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
        .into_iter()
        .find(|s| max / 1e6 / s <= 8.0)
        .unwrap_or(10.0);
    let axis_max = ((max / 1e6 / step).ceil() * step).max(step);
    let y_of = |v: f64| top + plot_h - ((v / 1e6 / axis_max) * plot_h as f64) as i32;
    let draw_err = |e| anyhow::anyhow!("plot: {e:?}");
    // Grid and axis.
    let ticks = (axis_max / step).round() as i32;
    for i in 0..=ticks {
        let v = f64::from(i) * step;
        let y = y_of(v * 1e6);
        root.draw(&PathElement::new(
            vec![(left, y), (width - right, y)],
            RGBColor(225, 225, 225),
        ))
        .map_err(draw_err)?;
        if text {
            root.draw(&Text::new(
                format!("{v:.1}"),
                (left - 45, y - 8),
                ("sans-serif", 16).into_font(),
            ))
            .map_err(draw_err)?;
        }
    }
    root.draw(&PathElement::new(
        vec![
            (left, top),
            (left, top + plot_h),
            (width - right, top + plot_h),
        ],
        BLACK,
    ))
    .map_err(draw_err)?;
    // Bars.
    let group_w = plot_w / groups.len().max(1) as i32;
    let bar_w = (group_w - 40) / series.len().max(1) as i32;
    for (g, group) in groups.iter().enumerate() {
        let x0 = left + g as i32 * group_w + 20;
        for (s, value) in group.values.iter().enumerate() {
            let Some(value) = value else { continue };
            let x = x0 + s as i32 * bar_w;
            let color = COLORS[s % COLORS.len()];
            root.draw(&Rectangle::new(
                [(x + 2, y_of(*value)), (x + bar_w - 2, top + plot_h)],
                color.filled(),
            ))
            .map_err(draw_err)?;
            if text {
                let label = if *value >= 1e6 {
                    format!("{:.2}M", value / 1e6)
                } else {
                    format!("{:.0}k", value / 1e3)
                };
                root.draw(&Text::new(
                    label,
                    (x + 4, y_of(*value) - 18),
                    ("sans-serif", 14).into_font(),
                ))
                .map_err(draw_err)?;
            }
        }
        if text {
            root.draw(&Text::new(
                group.label.clone(),
                (x0 + 10, top + plot_h + 12),
                ("sans-serif", 17).into_font(),
            ))
            .map_err(draw_err)?;
        }
    }
    if text {
        root.draw(&Text::new(
            title.to_owned(),
            (left, 12),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(draw_err)?;
        root.draw(&Text::new(
            "Mpps".to_owned(),
            (10, top - 30),
            ("sans-serif", 16).into_font(),
        ))
        .map_err(draw_err)?;
        let mut x = left;
        for (s, name) in series.iter().enumerate() {
            let y = height - 28;
            root.draw(&Rectangle::new(
                [(x, y), (x + 16, y + 16)],
                COLORS[s % COLORS.len()].filled(),
            ))
            .map_err(draw_err)?;
            root.draw(&Text::new(
                (*name).to_owned(),
                (x + 22, y),
                ("sans-serif", 16).into_font(),
            ))
            .map_err(draw_err)?;
            x += 30 + 10 * name.len() as i32;
        }
    } else {
        // Legend swatches only.
        for s in 0..series.len() {
            let x = left + s as i32 * 40;
            root.draw(&Rectangle::new(
                [(x, height - 28), (x + 16, height - 12)],
                COLORS[s % COLORS.len()].filled(),
            ))
            .map_err(draw_err)?;
        }
    }
    root.present().context("write the PNG")?;
    Ok(())
}
