//! The bench's bar chart: delivered packet rate per system, grouped by
//! direction and payload size. Text needs a TrueType font: DejaVu Sans is
//! read at run time if the machine has it (no build-time font dependency);
//! without it the chart has bars and no labels.

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
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

/// One colour per series; the bench's XDP modes and their floors come in pairs
/// of one hue (dark: the relay, light: its floor).
const COLORS: [RGBColor; 6] = [
    RGBColor(150, 150, 150),
    RGBColor(60, 110, 200),
    RGBColor(220, 110, 20),
    RGBColor(245, 185, 120),
    RGBColor(40, 140, 60),
    RGBColor(140, 205, 140),
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

/// The canvas, in pixels.
const WIDTH: i32 = 1100;
const HEIGHT: i32 = 600;
/// The margins around the plot area, in pixels.
const LEFT: i32 = 80;
const RIGHT: i32 = 20;
const TOP: i32 = 70;
const BOTTOM: i32 = 70;
/// The plot area, in pixels.
const PLOT_W: i32 = WIDTH - LEFT - RIGHT;
const PLOT_H: i32 = HEIGHT - TOP - BOTTOM;

/// Draws the chart to `path` (PNG).
pub fn draw(path: &Path, title: &str, series: &[&str], groups: &[Group]) -> anyhow::Result<()> {
    let text = register_font();
    let root = BitMapBackend::new(path, (WIDTH as u32, HEIGHT as u32)).into_drawing_area();
    root.fill(&WHITE).context("fill")?;
    let chart = Chart::new(root, text, groups);
    chart.grid()?;
    chart.bars(series.len(), groups)?;
    if text {
        chart.titles(title)?;
        chart.legend(series)?;
    } else {
        chart.swatches(series.len())?;
    }
    chart.root.present().context("write the PNG")?;
    Ok(())
}

/// A drawing error of plotters as an [`anyhow::Error`].
fn plot_error(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("plot: {e:?}")
}

/// The chart being drawn: its canvas and the vertical scale every step shares.
struct Chart<'a> {
    root: DrawingArea<BitMapBackend<'a>, Shift>,
    /// Whether a font was found: without one, no text is drawn.
    text: bool,
    /// The spacing of the axis ticks, in Mpps.
    step: f64,
    /// The top of the axis, in Mpps: a whole number of steps.
    axis_max: f64,
}

impl<'a> Chart<'a> {
    /// A chart on `root` whose axis holds the largest value of `groups`.
    fn new(root: DrawingArea<BitMapBackend<'a>, Shift>, text: bool, groups: &[Group]) -> Self {
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
        Self {
            root,
            text,
            step,
            axis_max,
        }
    }

    /// The pixel row of `v` packets per second.
    fn y_of(&self, v: f64) -> i32 {
        TOP + PLOT_H - ((v / 1e6 / self.axis_max) * PLOT_H as f64) as i32
    }

    /// The horizontal grid lines with their values, and the axes.
    fn grid(&self) -> anyhow::Result<()> {
        let ticks = (self.axis_max / self.step).round() as i32;
        for i in 0..=ticks {
            let v = f64::from(i) * self.step;
            let y = self.y_of(v * 1e6);
            self.root
                .draw(&PathElement::new(
                    vec![(LEFT, y), (WIDTH - RIGHT, y)],
                    RGBColor(225, 225, 225),
                ))
                .map_err(plot_error)?;
            if self.text {
                self.root
                    .draw(&Text::new(
                        format!("{v:.1}"),
                        (LEFT - 45, y - 8),
                        ("sans-serif", 16).into_font(),
                    ))
                    .map_err(plot_error)?;
            }
        }
        self.root
            .draw(&PathElement::new(
                vec![
                    (LEFT, TOP),
                    (LEFT, TOP + PLOT_H),
                    (WIDTH - RIGHT, TOP + PLOT_H),
                ],
                BLACK,
            ))
            .map_err(plot_error)?;
        Ok(())
    }

    /// The bars of every group, `series` to a group, with the group labels.
    fn bars(&self, series: usize, groups: &[Group]) -> anyhow::Result<()> {
        let group_w = PLOT_W / groups.len().max(1) as i32;
        let bar_w = (group_w - 40) / series.max(1) as i32;
        for (g, group) in groups.iter().enumerate() {
            let x0 = LEFT + g as i32 * group_w + 20;
            for (s, value) in group.values.iter().enumerate() {
                let Some(value) = value else { continue };
                self.bar(
                    x0 + s as i32 * bar_w,
                    bar_w,
                    COLORS[s % COLORS.len()],
                    *value,
                )?;
            }
            if self.text {
                self.root
                    .draw(&Text::new(
                        group.label.clone(),
                        (x0 + 10, TOP + PLOT_H + 12),
                        ("sans-serif", 17).into_font(),
                    ))
                    .map_err(plot_error)?;
            }
        }
        Ok(())
    }

    /// One bar of `value` packets per second, `bar_w` wide from `x`, with its value.
    fn bar(&self, x: i32, bar_w: i32, color: RGBColor, value: f64) -> anyhow::Result<()> {
        self.root
            .draw(&Rectangle::new(
                [(x + 2, self.y_of(value)), (x + bar_w - 2, TOP + PLOT_H)],
                color.filled(),
            ))
            .map_err(plot_error)?;
        if self.text {
            let label = if value >= 1e6 {
                format!("{:.2}M", value / 1e6)
            } else {
                format!("{:.0}k", value / 1e3)
            };
            self.root
                .draw(&Text::new(
                    label,
                    (x + 2, self.y_of(value) - 16),
                    ("sans-serif", if bar_w < 40 { 12 } else { 14 }).into_font(),
                ))
                .map_err(plot_error)?;
        }
        Ok(())
    }

    /// The chart's title and the axis unit.
    fn titles(&self, title: &str) -> anyhow::Result<()> {
        self.root
            .draw(&Text::new(
                title.to_owned(),
                (LEFT, 12),
                ("sans-serif", 20).into_font(),
            ))
            .map_err(plot_error)?;
        self.root
            .draw(&Text::new(
                "Mpps".to_owned(),
                (10, TOP - 30),
                ("sans-serif", 16).into_font(),
            ))
            .map_err(plot_error)?;
        Ok(())
    }

    /// The legend: a swatch and the name of every series.
    fn legend(&self, series: &[&str]) -> anyhow::Result<()> {
        let mut x = LEFT;
        for (s, name) in series.iter().enumerate() {
            let y = HEIGHT - 28;
            self.root
                .draw(&Rectangle::new(
                    [(x, y), (x + 16, y + 16)],
                    COLORS[s % COLORS.len()].filled(),
                ))
                .map_err(plot_error)?;
            self.root
                .draw(&Text::new(
                    (*name).to_owned(),
                    (x + 22, y),
                    ("sans-serif", 16).into_font(),
                ))
                .map_err(plot_error)?;
            x += 30 + 10 * name.len() as i32;
        }
        Ok(())
    }

    /// The legend without a font: the swatches of `series` series only.
    fn swatches(&self, series: usize) -> anyhow::Result<()> {
        for s in 0..series {
            let x = LEFT + s as i32 * 40;
            self.root
                .draw(&Rectangle::new(
                    [(x, HEIGHT - 28), (x + 16, HEIGHT - 12)],
                    COLORS[s % COLORS.len()].filled(),
                ))
                .map_err(plot_error)?;
        }
        Ok(())
    }
}
