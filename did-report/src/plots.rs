//! The report's figures, each drawn once over plotters' backend trait and
//! saved as SVG and PNG. Text uses the committed DejaVu Sans subset, so no
//! system font is needed anywhere.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::claims::Judge;
use crate::results::{Results, Stat};

const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans-subset.ttf");
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Registers the font plotters draws text with (once per process is enough;
/// later calls are harmless).
pub fn register_font() -> Result<(), String> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| {
        "the committed font did-report/fonts/DejaVuSans-subset.ttf is unreadable".into()
    })
}

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("plotting: {e}")
}

/// A figure that can be drawn on any plotters backend.
pub trait Figure {
    /// Size in pixels (SVG units).
    fn size(&self) -> (u32, u32);
    /// Draws onto `root`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>
    where
        DB::ErrorType: 'static;
}

/// Writes `<stem>.svg` and `<stem>.png` into `dir`.
pub fn save(figure: &impl Figure, dir: &Path, stem: &str) -> Result<(), String> {
    let size = figure.size();
    let svg = dir.join(format!("{stem}.svg"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        figure.draw(&root)?;
        root.present().map_err(err)?;
    }
    let png = dir.join(format!("{stem}.png"));
    let root = BitMapBackend::new(&png, size).into_drawing_area();
    figure.draw(&root)?;
    root.present().map_err(err)
}

/// A labelled point with a vertical spread.
#[derive(Debug, Clone)]
pub struct Point {
    /// The experiment.
    pub label: String,
    /// x (NFE or seconds).
    pub x: f64,
    /// y (perplexity): mean and spread over seeds.
    pub y: Stat,
}

/// Points on the lower-left frontier: no other point has both a smaller x and
/// a smaller y. Sorted by x.
pub fn pareto_front(points: &[Point]) -> Vec<&Point> {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| a.x.total_cmp(&b.x).then(a.y.mean.total_cmp(&b.y.mean)));
    let mut front: Vec<&Point> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|last| p.y.mean < last.y.mean) {
            front.push(p);
        }
    }
    front
}

fn log_range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() || lo <= 0.0 {
        return (1.0, 10.0);
    }
    (lo / 1.3, hi * 1.3)
}

/// One panel: points with spread bars, their Pareto front, labels; log axes.
fn scatter_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    points: &[Point],
    x_desc: &str,
    y_desc: &str,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let (x0, x1) = log_range(points.iter().map(|p| p.x));
    let (y0, y1) = log_range(
        points
            .iter()
            .flat_map(|p| [p.y.mean - p.y.std, p.y.mean + p.y.std])
            .filter(|v| *v > 0.0),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    // The front over the diffusion samplers: the AR model is the reference point.
    let diffusion: Vec<Point> = points.iter().filter(|p| p.label != "ar").cloned().collect();
    let front = pareto_front(&diffusion);
    chart
        .draw_series(LineSeries::new(
            front.iter().map(|p| (p.x, p.y.mean)),
            COLORS[1].stroke_width(2),
        ))
        .map_err(err)?
        .label("Pareto front of the diffusion samplers")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[1].stroke_width(2)));
    chart
        .draw_series(points.iter().map(|p| {
            PathElement::new(
                vec![
                    (p.x, (p.y.mean - p.y.std).max(y0)),
                    (p.x, p.y.mean + p.y.std),
                ],
                COLORS[0].stroke_width(1),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.x, p.y.mean), 4, COLORS[0].filled())),
        )
        .map_err(err)?;
    chart
        .draw_series(points.iter().map(|p| {
            Text::new(
                format!(" {}", p.label),
                (p.x, p.y.mean),
                ("sans-serif", 11).into_font(),
            )
        }))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)
}

/// NFE or wall time against both judges' perplexity, over every sampler.
pub struct ParetoFigure {
    /// One set of points per judge.
    pub panels: Vec<(String, Vec<Point>)>,
    /// The x axis.
    pub x_desc: String,
}

impl ParetoFigure {
    /// Every experiment, x = NFE (`by_time` false) or seconds per sample.
    pub fn new(results: &Results, by_time: bool) -> Self {
        let panels = Judge::ALL
            .iter()
            .map(|judge| {
                let points = results
                    .experiments
                    .values()
                    .map(|e| Point {
                        label: e.name.clone(),
                        x: if by_time {
                            e.fastest_seconds_per_sample()
                        } else {
                            e.stat(|r| r.nfe).mean
                        },
                        y: match judge {
                            Judge::Causal => e.stat(|r| r.gen_ppl),
                            Judge::WordTrigram => e.stat(|r| r.word_ppl_charged),
                        },
                    })
                    .filter(|p| p.x > 0.0 && p.x.is_finite() && p.y.mean.is_finite())
                    .collect();
                let title = match judge {
                    Judge::Causal => "causal judge (token perplexity)",
                    Judge::WordTrigram => "CMU word trigram (OOV charged)",
                };
                (title.to_string(), points)
            })
            .collect();
        ParetoFigure {
            panels,
            x_desc: if by_time {
                "seconds per sample, fastest seed (batch of 64)".into()
            } else {
                "NFE (model calls per sample)".into()
            },
        }
    }
}

impl Figure for ParetoFigure {
    fn size(&self) -> (u32, u32) {
        (1400, 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((1, self.panels.len().max(1)));
        for (area, (title, points)) in areas.iter().zip(&self.panels) {
            scatter_panel(
                area,
                title,
                points,
                &self.x_desc,
                "perplexity (mean ± spread over seeds)",
            )?;
        }
        Ok(())
    }
}

/// A family's name and its points.
pub type Family = (&'static str, Vec<Point>);

/// One model's plans by family (crate::adaptive::family): each family's points and its own
/// Pareto front, NFE or wall time against both judges.
pub struct FrontsFigure {
    /// Per judge: title, then per family its points.
    pub panels: Vec<(String, Vec<Family>)>,
    /// The x axis.
    pub x_desc: String,
}

impl FrontsFigure {
    /// The diffusion plans of `model`; x = NFE, or the fastest seed's seconds per sample.
    pub fn new(results: &Results, model: &str, by_time: bool) -> Self {
        let base = ParetoFigure::new(results, by_time);
        let panels = base
            .panels
            .into_iter()
            .map(|(title, points)| {
                let families = crate::adaptive::FAMILIES
                    .iter()
                    .map(|&f| {
                        let members = points
                            .iter()
                            .filter(|p| {
                                results.experiments.get(&p.label).is_some_and(|e| {
                                    e.model == model
                                        && e.remask.as_deref().is_none_or(|r| r == "snapshot")
                                        && e.stages
                                            .as_deref()
                                            .is_some_and(|s| crate::adaptive::family(s) == f)
                                })
                            })
                            .cloned()
                            .collect();
                        (f, members)
                    })
                    .collect();
                (title, families)
            })
            .collect();
        FrontsFigure {
            panels,
            x_desc: base.x_desc,
        }
    }
}

impl Figure for FrontsFigure {
    fn size(&self) -> (u32, u32) {
        (1400, 600)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((1, self.panels.len().max(1)));
        for (area, (title, families)) in areas.iter().zip(&self.panels) {
            let all = families.iter().flat_map(|f| f.1.iter());
            let (x0, x1) = log_range(all.clone().map(|p| p.x));
            let (y0, y1) = log_range(
                all.flat_map(|p| [p.y.mean - p.y.std, p.y.mean + p.y.std])
                    .filter(|v| *v > 0.0),
            );
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc.as_str())
                .y_desc("perplexity (mean ± spread over seeds)")
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(err)?;
            for (i, (name, points)) in families.iter().enumerate().filter(|(_, f)| !f.1.is_empty())
            {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        pareto_front(points).iter().map(|p| (p.x, p.y.mean)),
                        color.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|p| {
                        PathElement::new(
                            vec![
                                (p.x, (p.y.mean - p.y.std).max(y0)),
                                (p.x, p.y.mean + p.y.std),
                            ],
                            color.stroke_width(1),
                        )
                    }))
                    .map_err(err)?;
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|p| Circle::new((p.x, p.y.mean), 4, color.filled())),
                    )
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }
        Ok(())
    }
}

/// A named line of (x, mean ± spread) points.
pub type Series = (String, Vec<(f64, Stat)>);

/// Lines of (x, mean ± spread), one per series, per panel.
pub struct LinesFigure {
    /// Panels: title, y label, series.
    pub panels: Vec<(String, String, Vec<Series>)>,
    /// The x axis.
    pub x_desc: String,
    /// Log y axis.
    pub log_y: bool,
}

fn lines_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    x_desc: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let x0 = xs.clone().fold(f64::INFINITY, f64::min);
    let x1 = xs.fold(f64::NEG_INFINITY, f64::max);
    let (x0, x1) = match (x0.is_finite(), x1 > x0) {
        (true, true) => (x0, x1),
        (true, false) => (x0 - 1.0, x1 + 1.0), // one x value: centre it
        _ => (0.0, 1.0),
    };
    let ys = series
        .iter()
        .flat_map(|s| {
            s.1.iter()
                .flat_map(|p| [p.1.mean - p.1.std, p.1.mean + p.1.std])
        })
        .filter(|v| v.is_finite());
    let pad = (x1 - x0) * 0.03;
    let mut builder = ChartBuilder::on(area);
    let chart = builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    // The two y scales are different coordinate types: one body, expanded twice.
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(err)?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        points.iter().map(|p| (p.0, p.1.mean)),
                        color.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|p| {
                        PathElement::new(
                            vec![(p.0, p.1.mean - p.1.std), (p.0, p.1.mean + p.1.std)],
                            color.stroke_width(1),
                        )
                    }))
                    .map_err(err)?;
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|p| Circle::new((p.0, p.1.mean), 3, color.filled())),
                    )
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }};
    }
    if log_y {
        let (y0, y1) = log_range(ys.filter(|v| *v > 0.0));
        body!(chart
            .build_cartesian_2d(x0 - pad..x1 + pad, (y0..y1).log_scale())
            .map_err(err)?);
    } else {
        let y0 = ys.clone().fold(f64::INFINITY, f64::min);
        let y1 = ys.fold(f64::NEG_INFINITY, f64::max);
        let (y0, y1) = match (y0.is_finite(), y1 > y0) {
            (true, true) => (y0, y1),
            (true, false) => (y0 - 1.0, y1 + 1.0),
            _ => (0.0, 1.0),
        };
        let ypad = (y1 - y0) * 0.05;
        body!(chart
            .build_cartesian_2d(x0 - pad..x1 + pad, y0 - ypad..y1 + ypad)
            .map_err(err)?);
    }
    Ok(())
}

impl Figure for LinesFigure {
    fn size(&self) -> (u32, u32) {
        (1400, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((1, self.panels.len().max(1)));
        for (area, (title, y_desc, series)) in areas.iter().zip(&self.panels) {
            lines_panel(area, title, y_desc, &self.x_desc, series, self.log_y)?;
        }
        Ok(())
    }
}

/// γ (0 = the draft alone) against both judges.
pub fn gamma_figure(results: &Results) -> LinesFigure {
    let gammas = [
        (0.0, "mix.draft"),
        (0.1, "mix.gamma-0.1"),
        (0.25, "mix.snapshot"),
        (0.5, "mix.gamma-0.5"),
        (0.75, "mix.gamma-0.75"),
        (1.0, "mix.gamma-1.0"),
    ];
    let panels = Judge::ALL
        .iter()
        .map(|judge| {
            let points: Vec<(f64, Stat)> = gammas
                .iter()
                .filter_map(|(g, e)| {
                    let e = results.experiments.get(*e)?;
                    Some((
                        *g,
                        match judge {
                            Judge::Causal => e.stat(|r| r.gen_ppl),
                            Judge::WordTrigram => e.stat(|r| r.word_ppl_charged),
                        },
                    ))
                })
                .filter(|(_, s)| s.mean.is_finite())
                .collect();
            let (title, y) = match judge {
                Judge::Causal => ("causal judge", "token perplexity"),
                Judge::WordTrigram => ("CMU word trigram", "word perplexity (OOV charged)"),
            };
            (
                title.to_string(),
                y.to_string(),
                vec![(
                    "mix-scale, snapshot remask, global refine".to_string(),
                    points,
                )],
            )
        })
        .collect();
    LinesFigure {
        panels,
        x_desc: "remask ratio γ (0 = draft only)".into(),
        log_y: false,
    }
}

/// Training and validation loss of every model.
pub fn training_figure(results: &Results) -> LinesFigure {
    let one = |v: f64| Stat {
        mean: v,
        std: 0.0,
        n: 1,
    };
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for m in results.models.values() {
        // A running mean over 20 steps: single steps are noisy at batch 16.
        let smoothed: Vec<(f64, Stat)> = m
            .loss
            .iter()
            .enumerate()
            .map(|(i, &(step, _))| {
                let from = i.saturating_sub(19);
                let w = &m.loss[from..=i];
                (
                    step as f64,
                    one(w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64),
                )
            })
            .collect();
        train.push((m.name.clone(), smoothed));
        valid.push((
            m.name.clone(),
            m.valid_loss
                .iter()
                .map(|&(s, l)| (s as f64, one(l)))
                .collect(),
        ));
    }
    LinesFigure {
        panels: vec![
            (
                "training loss (running mean of 20 steps)".into(),
                "nats per token".into(),
                train,
            ),
            ("validation loss".into(), "nats per token".into(), valid),
        ],
        x_desc: "optimizer step".into(),
        log_y: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(x: f64, y: f64) -> Point {
        Point {
            label: format!("{x},{y}"),
            x,
            y: Stat {
                mean: y,
                std: 0.0,
                n: 1,
            },
        }
    }

    #[test]
    fn pareto_front_keeps_only_undominated_points() {
        let pts = [
            p(1.0, 10.0),
            p(2.0, 12.0),
            p(3.0, 8.0),
            p(4.0, 9.0),
            p(5.0, 5.0),
        ];
        let front: Vec<(f64, f64)> = pareto_front(&pts).iter().map(|p| (p.x, p.y.mean)).collect();
        assert_eq!(front, vec![(1.0, 10.0), (3.0, 8.0), (5.0, 5.0)]);
    }
}
