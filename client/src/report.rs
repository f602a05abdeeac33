//! Reports: latency statistics from histograms, the JSON shapes, and the text tables.

use std::collections::BTreeMap;
use std::time::Duration;

use qreformulate::{guards::FallbackReason, pb};
use serde::Serialize;

/// The name of a wire fallback reason (`off_topic`); `None` when the answer is the model's.
pub fn fallback_name(reason: i32) -> Option<&'static str> {
    match pb::FallbackReason::try_from(reason) {
        Ok(wire) => Option::<FallbackReason>::from(wire).map(FallbackReason::name),
        // A newer server's reason this client does not know.
        Err(_) => Some("unknown"),
    }
}

/// Latency summary in milliseconds (the JSON shape of every latency block).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub median_ms: f64,
    pub std_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
}

impl Latency {
    pub fn from_proto(stats: &pb::LatencyStats) -> Self {
        Latency {
            count: stats.count,
            mean_ms: stats.mean_ms,
            median_ms: stats.median_ms,
            std_ms: stats.std_ms,
            p90_ms: stats.p90_ms,
            p95_ms: stats.p95_ms,
            p99_ms: stats.p99_ms,
            max_ms: stats.max_ms,
            min_ms: stats.min_ms,
        }
    }

    /// (label, value) pairs in display order.
    pub fn rows(&self) -> [(&'static str, f64); 8] {
        [
            ("mean", self.mean_ms),
            ("median", self.median_ms),
            ("std", self.std_ms),
            ("p90", self.p90_ms),
            ("p95", self.p95_ms),
            ("p99", self.p99_ms),
            ("max", self.max_ms),
            ("min", self.min_ms),
        ]
    }
}

// ---------------------------------------------------------------------------------------
// JSON shapes

/// Server-side timings of a client-side bench: the server's total time of every successful
/// request, and phase means over the requests that ran the engine (cache hits excluded).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerTimings {
    /// Server-reported total time per request.
    pub latency_ms: Latency,
    pub mean_tokenize_ms: f64,
    pub mean_encode_ms: f64,
    pub mean_decode_ms: f64,
    pub mean_generated_tokens: f64,
    pub generated_tokens: u64,
    /// Decoder steps those tokens took (fewer with the server's draft tokens).
    pub decoder_steps: u64,
    /// Answers served from the server's response cache.
    pub cached: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub mode: &'static str,
    pub model_id: String,
    /// Measured requests sent (successful + failed).
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    /// Failed requests by gRPC code name.
    pub errors_by_code: BTreeMap<String, u64>,
    pub concurrency: u32,
    pub connections: u32,
    pub warmup: u64,
    pub wall_seconds: f64,
    /// Successful requests per second of wall time.
    pub throughput_rps: f64,
    /// Client-observed latency of the successful requests.
    pub latency_ms: Latency,
    pub server: ServerTimings,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerBenchReport {
    pub mode: &'static str,
    pub model_id: String,
    pub requests: u64,
    pub warmup: u64,
    pub wall_seconds: f64,
    pub throughput_rps: f64,
    pub generated_tokens: u64,
    pub tokens_per_second: f64,
    pub latency_ms: Latency,
    pub mean_tokenize_ms: f64,
    pub mean_encode_ms: f64,
    pub mean_decode_ms: f64,
}

impl ServerBenchReport {
    pub fn from_proto(response: &pb::BenchmarkResponse, warmup: u64) -> Self {
        let latency = response.latency.as_ref().map(Latency::from_proto).unwrap_or_default();
        ServerBenchReport {
            mode: "server",
            model_id: response.model_id.clone(),
            requests: response.requests,
            warmup,
            wall_seconds: response.wall_seconds,
            throughput_rps: rate(response.requests, response.wall_seconds),
            generated_tokens: response.generated_tokens,
            tokens_per_second: response.tokens_per_second,
            latency_ms: latency,
            mean_tokenize_ms: response.mean_tokenize_ms,
            mean_encode_ms: response.mean_encode_ms,
            mean_decode_ms: response.mean_decode_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRow {
    pub name: String,
    pub examples: u32,
    pub exact_match: f64,
    pub rouge_l: f64,
    pub count_accuracy: f64,
    pub levenshtein: f64,
    /// `null` when the model has no grounding file.
    pub invented_rate: Option<f64>,
    pub degenerate_rate: f64,
    pub fallback_rate: f64,
}

impl MetricRow {
    fn empty(name: &str) -> Self {
        MetricRow::from(&pb::MetricRow { name: name.into(), ..pb::MetricRow::default() })
    }
}

impl From<&pb::MetricRow> for MetricRow {
    fn from(row: &pb::MetricRow) -> Self {
        MetricRow {
            name: row.name.clone(),
            examples: row.examples,
            exact_match: row.exact_match,
            rouge_l: row.rouge_l,
            count_accuracy: row.count_accuracy,
            levenshtein: row.levenshtein,
            invented_rate: row.invented_rate,
            degenerate_rate: row.degenerate_rate,
            fallback_rate: row.fallback_rate,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExampleResult {
    pub query: String,
    pub kind: String,
    pub expected: Vec<String>,
    pub predicted: Vec<String>,
    pub exact_match: bool,
    pub rouge_l: f64,
    pub latency_ms: f64,
    /// Why the prediction is the query itself; `null` when it is the model's.
    pub fallback_reason: Option<&'static str>,
    pub invented: bool,
    pub degenerate: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub model_id: String,
    pub overall: MetricRow,
    pub per_kind: Vec<MetricRow>,
    /// The echo baseline (the query as the only subquery), row for row.
    pub echo_overall: MetricRow,
    pub echo_per_kind: Vec<MetricRow>,
    pub latency_ms: Latency,
    pub examples: Vec<ExampleResult>,
}

impl EvalReport {
    pub fn from_proto(response: &pb::EvaluateResponse) -> Self {
        let overall = |row: Option<&pb::MetricRow>| row.map_or_else(|| MetricRow::empty("overall"), MetricRow::from);
        EvalReport {
            model_id: response.model_id.clone(),
            overall: overall(response.overall.as_ref()),
            per_kind: response.per_kind.iter().map(MetricRow::from).collect(),
            echo_overall: overall(response.echo_overall.as_ref()),
            echo_per_kind: response.echo_per_kind.iter().map(MetricRow::from).collect(),
            latency_ms: response.latency.as_ref().map(Latency::from_proto).unwrap_or_default(),
            examples: response
                .examples
                .iter()
                .map(|e| ExampleResult {
                    query: e.query.clone(),
                    kind: e.kind.clone(),
                    expected: e.expected_subqueries.clone(),
                    predicted: e.predicted_subqueries.clone(),
                    exact_match: e.exact_match,
                    rouge_l: e.rouge_l,
                    latency_ms: e.latency_ms,
                    fallback_reason: fallback_name(e.fallback_reason),
                    invented: e.invented,
                    degenerate: e.degenerate,
                })
                .collect(),
        }
    }

    /// The echo baseline's row of the same name.
    fn echo(&self, name: &str) -> Option<&MetricRow> {
        std::iter::once(&self.echo_overall).chain(&self.echo_per_kind).find(|row| row.name == name)
    }
}

/// `count / seconds`, 0 when no time passed.
pub fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// Server-side timings of one answer (JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimingsJson {
    pub tokenize_ms: f64,
    pub encode_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    pub generated_tokens: u32,
    /// Decoder steps the answer took (fewer than the tokens with the server's draft tokens).
    pub decoder_steps: u32,
    pub input_tokens: u32,
    pub cached: bool,
}

impl From<&pb::Timings> for TimingsJson {
    fn from(t: &pb::Timings) -> Self {
        TimingsJson {
            tokenize_ms: t.tokenize_ms,
            encode_ms: t.encode_ms,
            decode_ms: t.decode_ms,
            total_ms: t.total_ms,
            generated_tokens: t.generated_tokens,
            decoder_steps: t.decoder_steps,
            input_tokens: t.input_tokens,
            cached: t.cached,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidateJson {
    pub subqueries: Vec<String>,
    pub text: String,
    pub score: f64,
    pub fallback_reason: Option<&'static str>,
    pub mean_logprob: f64,
}

/// One line of `reformulate --json`: `query`, `subqueries`, `latency_ms` first, then extras.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnswerJson {
    pub query: String,
    pub subqueries: Vec<String>,
    /// Client-observed latency.
    pub latency_ms: f64,
    pub server: Option<TimingsJson>,
    pub model_id: String,
    pub truncated: bool,
    /// Why the subqueries are the query itself (`off_topic`, ...); `null` when they are the
    /// model's.
    pub fallback_reason: Option<&'static str>,
    pub mean_logprob: f64,
    /// The model's grounding applied to this answer.
    pub grounded: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<CandidateJson>,
}

impl AnswerJson {
    pub fn new(query: &str, response: &pb::ReformulateResponse, latency: Duration) -> Self {
        AnswerJson {
            query: query.to_string(),
            subqueries: response.subqueries.clone(),
            // Whole microseconds: no float noise in the JSON.
            latency_ms: latency.as_micros() as f64 / 1000.0,
            server: response.timings.as_ref().map(TimingsJson::from),
            model_id: response.model_id.clone(),
            truncated: response.truncated,
            fallback_reason: fallback_name(response.fallback_reason),
            mean_logprob: response.mean_logprob,
            grounded: response.grounded,
            candidates: response
                .candidates
                .iter()
                .map(|c| CandidateJson {
                    subqueries: c.subqueries.clone(),
                    text: c.text.clone(),
                    score: c.score,
                    fallback_reason: fallback_name(c.fallback_reason),
                    mean_logprob: c.mean_logprob,
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Text rendering

/// The human form of one answer: the subqueries (one per line, or ` | `-joined), why they
/// are the query itself when they are, the candidates when there are several, and a latency
/// line.
pub fn render_answer(response: &pb::ReformulateResponse, latency: Duration, joined: bool) -> String {
    let mut out = String::new();
    if joined {
        out.push_str(&response.subqueries.join(" | "));
        out.push('\n');
    } else {
        for subquery in &response.subqueries {
            out.push_str(subquery);
            out.push('\n');
        }
    }
    if let Some(reason) = fallback_name(response.fallback_reason) {
        out.push_str(&format!("  (fallback: {reason} \u{2014} the query is returned unchanged)\n"));
    }
    if !response.candidates.is_empty() {
        out.push_str("  candidates:\n");
        for (i, candidate) in response.candidates.iter().enumerate() {
            out.push_str(&format!("  {:>3}. [{:.3}] {}\n", i + 1, candidate.score, candidate.subqueries.join(" | ")));
        }
    }
    out.push_str(&format!("  ({})\n", latency_line(response, latency)));
    out
}

fn latency_line(response: &pb::ReformulateResponse, latency: Duration) -> String {
    let client = format!("{} ms", ms(latency.as_secs_f64() * 1000.0));
    let mut line = match &response.timings {
        None => client,
        Some(t) if t.cached => format!("{client}; server {} ms, cached", ms(t.total_ms)),
        Some(t) => format!(
            "{client}; server {} ms: encode {}, decode {} ms, {} tokens{}",
            ms(t.total_ms),
            ms(t.encode_ms),
            ms(t.decode_ms),
            t.generated_tokens,
            // A server before decoder_steps sends 0.
            if t.decoder_steps > 0 { format!(" in {} steps", t.decoder_steps) } else { String::new() }
        ),
    };
    if response.truncated {
        line.push_str("; query truncated");
    }
    line
}

/// A part of a box: an optional heading on the separator line, then its lines.
pub struct Section {
    pub heading: Option<String>,
    pub lines: Vec<String>,
}

impl Section {
    pub fn new(heading: Option<&str>, lines: Vec<String>) -> Self {
        Section { heading: heading.map(str::to_string), lines }
    }
}

fn width(text: &str) -> usize {
    text.chars().count()
}

/// Draws sections in a rounded box titled `title`; the box is as wide as its widest line.
pub fn render_box(title: &str, sections: &[Section]) -> String {
    let mut inner = width(title) + 4;
    for section in sections {
        if let Some(heading) = &section.heading {
            inner = inner.max(width(heading) + 4);
        }
        for line in &section.lines {
            inner = inner.max(width(line) + 2);
        }
    }
    let rule = |left: char, heading: Option<&str>, right: char| -> String {
        match heading {
            Some(h) => {
                let fill = inner - width(h) - 3;
                format!("{left}─ {h} {}{right}\n", "─".repeat(fill))
            }
            None => format!("{left}{}{right}\n", "─".repeat(inner)),
        }
    };
    let mut out = rule('╭', Some(title), '╮');
    for (index, section) in sections.iter().enumerate() {
        if index > 0 {
            out.push_str(&rule('├', section.heading.as_deref(), '┤'));
        }
        for line in &section.lines {
            let pad = inner - width(line) - 1;
            out.push_str(&format!("│ {line}{}│\n", " ".repeat(pad)));
        }
    }
    out.push_str(&rule('╰', None, '╯'));
    out
}

/// Aligns rows into columns separated by two spaces: the first column left-aligned, the
/// others right-aligned. Rows may be shorter than the widest one.
pub fn columns(rows: &[Vec<String>]) -> Vec<String> {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; count];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(width(cell));
        }
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    let pad = " ".repeat(widths[i] - width(cell));
                    if i == 0 {
                        format!("{cell}{pad}")
                    } else {
                        format!("{pad}{cell}")
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// Label/value lines: both columns left-aligned.
pub fn pairs(rows: &[Vec<String>]) -> Vec<String> {
    let label = rows.iter().map(|r| r.first().map_or(0, |c| width(c))).max().unwrap_or(0);
    rows.iter()
        .map(|row| {
            let first = row.first().map_or("", String::as_str);
            let rest = row[1.min(row.len())..].join("  ");
            let pad = " ".repeat(label - width(first));
            format!("{first}{pad}  {rest}").trim_end().to_string()
        })
        .collect()
}

pub fn ms(value: f64) -> String {
    format!("{value:.2}")
}

/// Generated tokens per decoder step; "-" when no step was counted (a server before
/// `decoder_steps`, or only cache hits).
fn tokens_per_step(tokens: u64, steps: u64) -> String {
    if steps == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", tokens as f64 / steps as f64)
    }
}

fn score(value: f64) -> String {
    format!("{value:.3}")
}

fn errors_line(errors_by_code: &BTreeMap<String, u64>) -> String {
    if errors_by_code.is_empty() {
        return "none".to_string();
    }
    errors_by_code.iter().map(|(code, n)| format!("{code} {n}")).collect::<Vec<_>>().join(", ")
}

/// The results box of a client-side bench.
pub fn render_bench(report: &BenchReport) -> String {
    let connections = if report.connections == 1 {
        "1 connection".to_string()
    } else {
        format!("{} connections", report.connections)
    };
    let summary = pairs(&[
        vec!["model".into(), or_dash(&report.model_id)],
        vec!["requests".into(), format!("{} ok, {} errors", report.ok, report.errors)],
        vec!["errors by code".into(), errors_line(&report.errors_by_code)],
        vec!["concurrency".into(), format!("{} in flight over {connections}", report.concurrency)],
        vec!["warm-up".into(), format!("{} requests", report.warmup)],
        vec!["wall time".into(), format!("{:.3} s", report.wall_seconds)],
        vec!["throughput".into(), format!("{:.2} req/s", report.throughput_rps)],
    ]);
    let mut latency = vec![vec![String::new(), "client ms".to_string(), "server ms".to_string()]];
    for ((label, client), (_, server)) in report.latency_ms.rows().into_iter().zip(report.server.latency_ms.rows()) {
        latency.push(vec![label.to_string(), ms(client), ms(server)]);
    }
    let server = &report.server;
    let phases = pairs(&[
        vec!["tokenize".into(), format!("{} ms", ms(server.mean_tokenize_ms))],
        vec!["encode".into(), format!("{} ms", ms(server.mean_encode_ms))],
        vec!["decode".into(), format!("{} ms", ms(server.mean_decode_ms))],
        vec![
            "generated tokens".into(),
            format!("{:.1} per request ({} in all)", server.mean_generated_tokens, server.generated_tokens),
        ],
        vec!["tokens per decoder step".into(), tokens_per_step(server.generated_tokens, server.decoder_steps)],
        vec!["cache hits".into(), format!("{} (not in the means above)", server.cached)],
    ]);
    render_box(
        "qclient bench",
        &[
            Section::new(None, summary),
            Section::new(Some("latency"), columns(&latency)),
            Section::new(Some("server phases (mean)"), phases),
        ],
    )
}

/// The results box of `bench --server-side`.
pub fn render_server_bench(report: &ServerBenchReport) -> String {
    let summary = pairs(&[
        vec!["model".into(), or_dash(&report.model_id)],
        vec!["requests".into(), report.requests.to_string()],
        vec!["warm-up".into(), format!("{} requests", report.warmup)],
        vec!["wall time".into(), format!("{:.3} s", report.wall_seconds)],
        vec!["throughput".into(), format!("{:.2} req/s", report.throughput_rps)],
        vec![
            "generated tokens".into(),
            format!("{} ({:.1} tokens/s)", report.generated_tokens, report.tokens_per_second),
        ],
    ]);
    let mut latency = vec![vec![String::new(), "server ms".to_string()]];
    for (label, value) in report.latency_ms.rows() {
        latency.push(vec![label.to_string(), ms(value)]);
    }
    let phases = pairs(&[
        vec!["tokenize".into(), format!("{} ms", ms(report.mean_tokenize_ms))],
        vec!["encode".into(), format!("{} ms", ms(report.mean_encode_ms))],
        vec!["decode".into(), format!("{} ms", ms(report.mean_decode_ms))],
    ]);
    render_box(
        "qclient bench --server-side (in-process on the server)",
        &[
            Section::new(None, summary),
            Section::new(Some("latency"), columns(&latency)),
            Section::new(Some("phases (mean)"), phases),
        ],
    )
}

/// The metric table (overall, then per kind; the guards' rates and the echo baseline's
/// ROUGE-L beside each row) and the latency percentiles of `eval`.
pub fn render_eval(report: &EvalReport, mismatches: usize) -> String {
    let mut rows = vec![[
        "",
        "examples",
        "exact match",
        "ROUGE-L",
        "count acc",
        "Levenshtein",
        "invented",
        "degenerate",
        "fallback",
        "echo ROUGE-L",
    ]
    .map(str::to_string)
    .to_vec()];
    for row in std::iter::once(&report.overall).chain(&report.per_kind) {
        rows.push(vec![
            or_dash(&row.name),
            row.examples.to_string(),
            score(row.exact_match),
            score(row.rouge_l),
            score(row.count_accuracy),
            score(row.levenshtein),
            row.invented_rate.map_or_else(|| "-".to_string(), score),
            score(row.degenerate_rate),
            score(row.fallback_rate),
            report.echo(&row.name).map_or_else(|| "-".to_string(), |echo| score(echo.rouge_l)),
        ]);
    }
    let latency = &report.latency_ms;
    let latency_lines = columns(&[
        vec![
            "".into(),
            "mean".into(),
            "median".into(),
            "std".into(),
            "p90".into(),
            "p95".into(),
            "p99".into(),
            "max".into(),
            "min".into(),
        ],
        std::iter::once("ms".to_string()).chain(latency.rows().iter().map(|(_, v)| ms(*v))).collect(),
    ]);
    let sections = vec![
        Section::new(None, vec![format!("model {}", or_dash(&report.model_id))]),
        Section::new(Some("metrics"), columns(&rows)),
        Section::new(Some(&format!("latency over {} examples", latency.count)), latency_lines),
    ];
    let mut out = render_box("qclient eval", &sections);
    // Examples go below the box: long queries would make it as wide as the longest one.
    let wrong: Vec<&ExampleResult> = report.examples.iter().filter(|e| !e.exact_match).take(mismatches).collect();
    if !wrong.is_empty() {
        out.push_str(&format!("\nmismatches (first {}):\n", wrong.len()));
        for example in wrong {
            out.push_str(&format!("\n  query      {}\n", example.query));
            if !example.kind.is_empty() {
                out.push_str(&format!("  kind       {}\n", example.kind));
            }
            out.push_str(&format!("  expected   {}\n", example.expected.join(" | ")));
            let fallback = example.fallback_reason.map(|r| format!(", fallback: {r}")).unwrap_or_default();
            out.push_str(&format!(
                "  predicted  {}   (ROUGE-L {}{fallback})\n",
                example.predicted.join(" | "),
                score(example.rouge_l)
            ));
        }
    }
    out
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qreformulate::latency::LatencyRecorder;

    fn latency(values_us: &[u64]) -> Latency {
        let mut recorder = LatencyRecorder::new();
        for v in values_us {
            recorder.record_micros(*v);
        }
        Latency::from_proto(&recorder.summary())
    }

    fn sample_response() -> pb::ReformulateResponse {
        pb::ReformulateResponse {
            subqueries: vec!["Nikola Tesla lifespan".into(), "Milutin Milankovic lifespan".into()],
            candidates: vec![],
            timings: Some(pb::Timings {
                tokenize_ms: 0.05,
                encode_ms: 1.2,
                decode_ms: 8.4,
                total_ms: 10.05,
                generated_tokens: 9,
                input_tokens: 14,
                cached: false,
                decoder_steps: 6,
            }),
            model_id: "qreformulate-t5".into(),
            truncated: false,
            fallback_reason: pb::FallbackReason::None.into(),
            mean_logprob: -0.125,
            grounded: true,
        }
    }

    #[test]
    fn answer_lists_subqueries_then_latency() {
        let text = render_answer(&sample_response(), Duration::from_micros(12_310), false);
        assert_eq!(
            text,
            "Nikola Tesla lifespan\nMilutin Milankovic lifespan\n  (12.31 ms; server 10.05 ms: encode 1.20, decode 8.40 ms, 9 tokens in 6 steps)\n"
        );
        let joined = render_answer(&sample_response(), Duration::from_millis(3), true);
        assert!(joined.starts_with("Nikola Tesla lifespan | Milutin Milankovic lifespan\n"), "{joined}");
    }

    #[test]
    fn answer_says_why_it_is_the_query() {
        let mut response = sample_response();
        response.subqueries = vec!["Who lived longer?".into()];
        response.set_fallback_reason(pb::FallbackReason::OffTopic);
        let text = render_answer(&response, Duration::from_millis(3), false);
        assert!(
            text.starts_with(
                "Who lived longer?\n  (fallback: off_topic \u{2014} the query is returned unchanged)\n  ("
            ),
            "{text}"
        );
        let json = serde_json::to_value(AnswerJson::new("Who lived longer?", &response, Duration::ZERO)).unwrap();
        assert_eq!(json["fallback_reason"], "off_topic");
        assert_eq!(json["mean_logprob"], -0.125);
        assert_eq!(json["grounded"], true);
        // A reason this client does not know yet (a newer server) is still a fallback.
        assert_eq!(fallback_name(99), Some("unknown"));
    }

    #[test]
    fn answer_shows_candidates_and_cache() {
        let mut response = sample_response();
        response.candidates = vec![pb::Candidate {
            subqueries: vec!["a".into(), "b".into()],
            text: "a | b".into(),
            score: -0.5,
            fallback_reason: pb::FallbackReason::None.into(),
            mean_logprob: -0.25,
        }];
        response.timings.as_mut().unwrap().cached = true;
        let text = render_answer(&response, Duration::from_millis(1), false);
        assert!(text.contains("    1. [-0.500] a | b"), "{text}");
        assert!(text.contains("server 10.05 ms, cached"), "{text}");
    }

    #[test]
    fn answer_json_starts_with_the_three_keys() {
        let json =
            serde_json::to_string(&AnswerJson::new("Who lived longer?", &sample_response(), Duration::from_millis(12)))
                .unwrap();
        assert!(
            json.starts_with("{\"query\":\"Who lived longer?\",\"subqueries\":[\"Nikola Tesla lifespan\",\"Milutin Milankovic lifespan\"],\"latency_ms\":12.0,"),
            "{json}"
        );
        assert!(!json.contains("candidates"), "{json}");
        assert!(json.contains("\"generated_tokens\":9"), "{json}");
        assert!(json.contains("\"decoder_steps\":6"), "{json}");
        assert!(json.contains("\"fallback_reason\":null,\"mean_logprob\":-0.125,\"grounded\":true"), "{json}");
    }

    #[test]
    fn latency_from_recorder_converts_micros_to_ms() {
        let l = latency(&(1..=100).map(|i| i * 1000).collect::<Vec<_>>());
        assert_eq!(l.count, 100);
        assert!((l.mean_ms - 50.5).abs() < 0.1, "{l:?}");
        assert!((l.median_ms - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p90_ms - 90.0).abs() < 0.1, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
        assert!((l.min_ms - 1.0).abs() < 0.01, "{l:?}");
        assert!((l.std_ms - 28.87).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn empty_recorder_gives_zeros() {
        assert_eq!(latency(&[]), Latency::default());
    }

    #[test]
    fn columns_align_first_left_rest_right() {
        let lines = columns(&[
            vec!["".into(), "client".into()],
            vec!["mean".into(), "1.50".into()],
            vec!["median".into(), "12.25".into()],
        ]);
        assert_eq!(lines, vec!["        client", "mean      1.50", "median   12.25"]);
    }

    #[test]
    fn pairs_align_labels_and_left_align_values() {
        let lines = pairs(&[vec!["model".into(), "m".into()], vec!["wall time".into(), "0.5 s".into()]]);
        assert_eq!(lines, vec!["model      m", "wall time  0.5 s"]);
    }

    #[test]
    fn box_lines_have_equal_width() {
        let text = render_box(
            "title",
            &[
                Section::new(None, vec!["short".into(), "a much longer line".into()]),
                Section::new(Some("second part"), vec!["x".into()]),
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        let w = width(lines[0]);
        assert!(lines.iter().all(|l| width(l) == w), "{text}");
        assert!(lines[0].starts_with("╭─ title "), "{text}");
        assert!(lines[3].starts_with("├─ second part "), "{text}");
        assert_eq!(lines[1], format!("│ short{}│", " ".repeat(w - 8)));
        assert!(lines[5].starts_with('╰') && lines[5].ends_with('╯'));
    }

    fn sample_bench() -> BenchReport {
        let latency = latency(&[10_000, 20_000, 30_000]);
        BenchReport {
            mode: "client",
            model_id: "qreformulate-t5".into(),
            requests: 4,
            ok: 3,
            errors: 1,
            errors_by_code: BTreeMap::from([("DEADLINE_EXCEEDED".to_string(), 1)]),
            concurrency: 2,
            connections: 1,
            warmup: 0,
            wall_seconds: 0.5,
            throughput_rps: 6.0,
            latency_ms: latency.clone(),
            server: ServerTimings {
                latency_ms: latency,
                mean_tokenize_ms: 0.1,
                mean_encode_ms: 1.0,
                mean_decode_ms: 5.0,
                mean_generated_tokens: 9.0,
                generated_tokens: 27,
                decoder_steps: 18,
                cached: 0,
            },
        }
    }

    #[test]
    fn bench_box_shows_every_statistic() {
        let text = render_bench(&sample_bench());
        for needle in [
            "qreformulate-t5",
            "3 ok, 1 errors",
            "DEADLINE_EXCEEDED 1",
            "2 in flight over 1 connection",
            "6.00 req/s",
            "client ms",
            "server ms",
            "median",
            "p90",
            "p95",
            "p99",
            "std",
            "max",
            "min",
            "encode",
            "decode",
            "9.0 per request (27 in all)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let mean_line = text.lines().find(|l| l.contains("mean ")).unwrap();
        assert!(mean_line.contains("20.0"), "{mean_line}");
    }

    #[test]
    fn bench_json_has_stable_keys() {
        let value = serde_json::to_value(sample_bench()).unwrap();
        assert_eq!(value["ok"], 3);
        assert_eq!(value["errors_by_code"]["DEADLINE_EXCEEDED"], 1);
        assert_eq!(value["latency_ms"]["count"], 3);
        for key in ["mean_ms", "median_ms", "std_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "min_ms"] {
            assert!(value["latency_ms"][key].is_number(), "{key}");
        }
        assert_eq!(value["server"]["generated_tokens"], 27);
        assert_eq!(value["server"]["decoder_steps"], 18);
    }

    #[test]
    fn bench_text_shows_tokens_per_decoder_step() {
        let text = render_bench(&sample_bench());
        let line = text.lines().find(|l| l.contains("tokens per decoder step")).expect("a tokens per step line");
        assert!(line.contains("1.50"), "{line}");
        assert_eq!(tokens_per_step(5, 0), "-");
    }

    #[test]
    fn eval_table_lists_overall_then_kinds_and_mismatches() {
        let row = |name: &str, examples| MetricRow {
            name: name.into(),
            examples,
            exact_match: 0.5,
            rouge_l: 0.75,
            count_accuracy: 1.0,
            levenshtein: 0.8126,
            invented_rate: Some(0.07),
            degenerate_rate: 0.125,
            fallback_rate: 0.25,
        };
        let echo = |name: &str| MetricRow { rouge_l: 0.3, invented_rate: None, ..row(name, 1) };
        let report = EvalReport {
            model_id: "m".into(),
            overall: row("overall", 2),
            per_kind: vec![row("comparison", 1), row("chaining", 1)],
            // No echo row for "chaining": its cell is a dash.
            echo_overall: echo("overall"),
            echo_per_kind: vec![echo("comparison")],
            latency_ms: Latency { count: 2, ..Latency::default() },
            examples: vec![
                ExampleResult {
                    query: "good".into(),
                    kind: "comparison".into(),
                    expected: vec!["a".into()],
                    predicted: vec!["a".into()],
                    exact_match: true,
                    rouge_l: 1.0,
                    latency_ms: 1.0,
                    fallback_reason: None,
                    invented: false,
                    degenerate: false,
                },
                ExampleResult {
                    query: "bad".into(),
                    kind: "chaining".into(),
                    expected: vec!["x".into(), "y".into()],
                    predicted: vec!["z".into()],
                    exact_match: false,
                    rouge_l: 0.0,
                    latency_ms: 1.0,
                    fallback_reason: Some("off_topic"),
                    invented: false,
                    degenerate: false,
                },
            ],
        };
        let text = render_eval(&report, 5);
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.contains("exact match")).unwrap();
        assert!(lines[header].contains("ROUGE-L") && lines[header].contains("Levenshtein"));
        assert!(lines[header + 1].contains("overall"), "{text}");
        assert!(lines[header + 2].contains("comparison"), "{text}");
        assert!(lines[header + 3].contains("chaining"), "{text}");
        assert!(lines[header + 1].contains("0.500  ") && lines[header + 1].contains("0.813"), "{text}");
        for column in ["invented", "degenerate", "fallback", "echo ROUGE-L"] {
            assert!(lines[header].contains(column), "{column}: {text}");
        }
        assert!(lines[header + 1].ends_with("0.070       0.125     0.250         0.300 │"), "{text}");
        assert!(lines[header + 3].ends_with("0.250             - │"), "{text}");
        assert!(text.contains("(ROUGE-L 0.000, fallback: off_topic)"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["overall"]["invented_rate"], 0.07);
        assert_eq!(json["echo_overall"]["invented_rate"], serde_json::Value::Null);
        assert_eq!(json["echo_per_kind"][0]["rouge_l"], 0.3);
        assert_eq!(json["examples"][1]["fallback_reason"], "off_topic");
        assert!(text.contains("latency over 2 examples"), "{text}");
        assert!(text.contains("\n  expected   x | y\n"), "{text}");
        assert!(text.contains("\n  kind       chaining\n"), "{text}");
        assert!(!text.contains("query      good"), "{text}");
        assert!(!render_eval(&report, 0).contains("mismatches"));
    }
}
