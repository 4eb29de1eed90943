//! Circuit breakers per task type, as a sans-IO state machine: the consume loop feeds each breaker the outcome of
//! every task it ran and the time, and asks whether a task of that type may start; it carries out what the state
//! says (pausing the type's partitions while the breaker is open, so that tasks wait in Kafka instead of burning
//! their attempts against a downstream that is down).
//!
//! - **Closed**: tasks run. It opens after `consecutive` retryable failures in a row, or when at least
//!   `min_calls` tasks ended within `window` and the share that failed retryably reached `failure_rate`.
//! - **Open**: no task of the type starts, for `open_for`.
//! - **Half-open**: up to `probes` tasks start; as many successes close it, any retryable failure opens it again.
//!
//! Only retryable failures count: a permanent one (`card_declined`, a bad input) says the downstream answered.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Most outcomes a breaker keeps for its failure rate, whatever its window.
const MAX_WINDOW_CALLS: usize = 10_000;

/// When a breaker opens and how it recovers.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub consecutive: u32,
    pub failure_rate: f64,
    pub min_calls: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub probes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive: 5,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(10),
            probes: 1,
        }
    }
}

impl BreakerPolicy {
    /// `TYPE` (the defaults) or `TYPE:KEY=VALUE,...` with keys `consecutive`, `failure_rate`, `min_calls`,
    /// `window`, `open_for`, `probes`; an error names what is wrong.
    pub fn parse(spec: &str) -> Result<(String, BreakerPolicy), String> {
        let (task_type, settings) = spec.split_once(':').unwrap_or((spec, ""));
        if task_type.is_empty() {
            return Err(format!(
                "circuit breaker `{spec}`: give the task type first, TYPE or TYPE:KEY=VALUE,..."
            ));
        }
        let mut policy = BreakerPolicy::default();
        for setting in settings.split(',').filter(|s| !s.trim().is_empty()) {
            let (key, value) = setting.split_once('=').ok_or_else(|| {
                format!("circuit breaker of {task_type}: `{setting}` is not KEY=VALUE")
            })?;
            let (key, value) = (key.trim(), value.trim());
            let bad = |what: &str| {
                format!("circuit breaker of {task_type}: {key} must be {what}, not `{value}`")
            };
            let count = |range: std::ops::RangeInclusive<u32>| {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| range.contains(n))
                    .ok_or_else(|| {
                        bad(&format!(
                            "a whole number from {} to {}",
                            range.start(),
                            range.end()
                        ))
                    })
            };
            let duration = |least: Duration| {
                humantime::parse_duration(value)
                    .ok()
                    .filter(|d| *d >= least && *d <= Duration::from_secs(3600))
                    .ok_or_else(|| bad(&format!("a duration from {least:?} to 1h, e.g. 10s")))
            };
            match key {
                "consecutive" => policy.consecutive = count(1..=10_000)?,
                "failure_rate" => {
                    policy.failure_rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| *r > 0.0 && *r <= 1.0)
                        .ok_or_else(|| bad("a share above 0 and at most 1, e.g. 0.5"))?
                }
                "min_calls" => policy.min_calls = count(1..=100_000)?,
                "window" => policy.window = duration(Duration::from_secs(1))?,
                "open_for" => policy.open_for = duration(Duration::from_millis(100))?,
                "probes" => policy.probes = count(1..=100)?,
                other => {
                    return Err(format!(
                    "circuit breaker of {task_type}: unknown setting `{other}`; use consecutive, \
                         failure_rate, min_calls, window, open_for or probes"
                ))
                }
            }
        }
        Ok((task_type.to_string(), policy))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }

    /// The value of `edow_circuit_state`.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// A change of state and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub task_type: String,
    pub from: State,
    pub to: State,
    pub why: String,
}

/// One task type's breaker.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: State,
    /// Closed: when tasks ended within the window, and whether each failed retryably.
    calls: VecDeque<(Instant, bool)>,
    failures_in_window: usize,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probes_started: u32,
    probe_successes: u32,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            state: State::Closed,
            calls: VecDeque::new(),
            failures_in_window: 0,
            consecutive_failures: 0,
            opened_at: None,
            probes_started: 0,
            probe_successes: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a task may start now.
    pub fn may_start(&self) -> bool {
        match self.state {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => self.probes_started < self.policy.probes,
        }
    }

    /// A task of this type started (in half-open, a probe).
    pub fn started(&mut self) {
        if self.state == State::HalfOpen {
            self.probes_started += 1;
        }
    }

    /// A task of this type ended, failed retryably or not, at `now`.
    pub fn record(&mut self, failed: bool, now: Instant) -> Option<(State, String)> {
        match self.state {
            // Tasks that were running when it opened: the breaker already knows the downstream is down.
            State::Open => None,
            State::HalfOpen if failed => Some(self.open(now, "a probe failed".into())),
            State::HalfOpen => {
                self.probe_successes += 1;
                if self.probe_successes < self.policy.probes {
                    return None;
                }
                self.state = State::Closed;
                self.clear();
                Some((
                    State::Closed,
                    format!("{} probe(s) succeeded", self.policy.probes),
                ))
            }
            State::Closed => {
                self.consecutive_failures = if failed {
                    self.consecutive_failures + 1
                } else {
                    0
                };
                self.calls.push_back((now, failed));
                self.failures_in_window += usize::from(failed);
                if self.calls.len() > MAX_WINDOW_CALLS {
                    self.forget_oldest();
                }
                self.prune(now);
                if self.consecutive_failures >= self.policy.consecutive {
                    let why = format!("{} failures in a row", self.consecutive_failures);
                    return Some(self.open(now, why));
                }
                let calls = self.calls.len();
                if calls >= self.policy.min_calls as usize
                    && self.failures_in_window as f64 >= self.policy.failure_rate * calls as f64
                {
                    let why = format!(
                        "{} of the last {calls} tasks failed within {:?}",
                        self.failures_in_window, self.policy.window
                    );
                    return Some(self.open(now, why));
                }
                None
            }
        }
    }

    /// Open for long enough: half-open.
    pub fn tick(&mut self, now: Instant) -> Option<(State, String)> {
        let opened = self.opened_at?;
        if self.state != State::Open || now.saturating_duration_since(opened) < self.policy.open_for
        {
            return None;
        }
        self.state = State::HalfOpen;
        self.probes_started = 0;
        self.probe_successes = 0;
        Some((
            State::HalfOpen,
            format!(
                "open for {:?}: probing with {} task(s)",
                self.policy.open_for, self.policy.probes
            ),
        ))
    }

    fn open(&mut self, now: Instant, why: String) -> (State, String) {
        self.state = State::Open;
        self.opened_at = Some(now);
        self.clear();
        (State::Open, why)
    }

    fn clear(&mut self) {
        self.calls.clear();
        self.failures_in_window = 0;
        self.consecutive_failures = 0;
        self.probes_started = 0;
        self.probe_successes = 0;
    }

    fn prune(&mut self, now: Instant) {
        while self
            .calls
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.policy.window)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, failed)) = self.calls.pop_front() {
            self.failures_in_window -= usize::from(failed);
        }
    }
}

/// The breakers of a worker's task types (types without one always run).
#[derive(Debug, Default)]
pub struct Breakers {
    by_type: HashMap<String, Breaker>,
}

impl Breakers {
    pub fn new(policies: HashMap<String, BreakerPolicy>) -> Breakers {
        Breakers {
            by_type: policies
                .into_iter()
                .map(|(task_type, policy)| (task_type, Breaker::new(policy)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    pub fn state(&self, task_type: &str) -> State {
        self.by_type
            .get(task_type)
            .map_or(State::Closed, Breaker::state)
    }

    pub fn may_start(&self, task_type: &str) -> bool {
        self.by_type.get(task_type).is_none_or(Breaker::may_start)
    }

    pub fn started(&mut self, task_type: &str) {
        if let Some(breaker) = self.by_type.get_mut(task_type) {
            breaker.started();
        }
    }

    pub fn record(&mut self, task_type: &str, failed: bool, now: Instant) -> Option<Transition> {
        let breaker = self.by_type.get_mut(task_type)?;
        let from = breaker.state();
        let (to, why) = breaker.record(failed, now)?;
        Some(Transition {
            task_type: task_type.to_string(),
            from,
            to,
            why,
        })
    }

    /// Moves every breaker open for long enough to half-open.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let mut changed = Vec::new();
        for (task_type, breaker) in &mut self.by_type {
            let from = breaker.state();
            if let Some((to, why)) = breaker.tick(now) {
                changed.push(Transition {
                    task_type: task_type.clone(),
                    from,
                    to,
                    why,
                });
            }
        }
        changed
    }

    /// Types whose breaker is not closed.
    pub fn not_closed(&self) -> impl Iterator<Item = (&str, State)> {
        self.by_type
            .iter()
            .filter(|(_, b)| b.state() != State::Closed)
            .map(|(t, b)| (t.as_str(), b.state()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive: 3,
            failure_rate: 0.5,
            min_calls: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(2),
            probes: 1,
        }
    }

    #[test]
    fn consecutive_failures_open_it_and_a_probe_closes_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy());
        assert_eq!(breaker.record(true, t0), None);
        assert_eq!(breaker.record(true, t0), None);
        let (state, why) = breaker.record(true, t0).unwrap();
        assert_eq!((state, why.as_str()), (State::Open, "3 failures in a row"));
        assert!(!breaker.may_start());
        assert_eq!(breaker.tick(t0 + Duration::from_millis(1999)), None);
        assert_eq!(
            breaker.tick(t0 + Duration::from_secs(2)).unwrap().0,
            State::HalfOpen
        );
        assert!(breaker.may_start());
        breaker.started();
        assert!(!breaker.may_start(), "one probe at a time");
        assert_eq!(breaker.record(false, t0).unwrap().0, State::Closed);
        assert!(breaker.may_start());
    }

    #[test]
    fn a_failed_probe_opens_it_again_for_another_period() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy());
        for _ in 0..3 {
            breaker.record(true, t0);
        }
        let later = t0 + Duration::from_secs(2);
        breaker.tick(later);
        breaker.started();
        assert_eq!(
            breaker.record(true, later).unwrap(),
            (State::Open, "a probe failed".into())
        );
        assert_eq!(breaker.tick(later + Duration::from_secs(1)), None);
        assert_eq!(
            breaker.tick(later + Duration::from_secs(2)).unwrap().0,
            State::HalfOpen
        );
    }

    #[test]
    fn the_failure_rate_opens_it_once_enough_calls_are_in_the_window() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(BreakerPolicy {
            consecutive: 100,
            ..policy()
        });
        // Alternating: never 3 in a row, but half of them fail.
        for i in 0..9 {
            assert_eq!(breaker.record(i % 2 == 0, t0), None, "{i}");
        }
        let (state, why) = breaker.record(true, t0).unwrap();
        assert_eq!(state, State::Open);
        assert!(why.starts_with("6 of the last 10"), "{why}");
        // Outside the window, old failures are forgotten.
        let mut breaker = Breaker::new(BreakerPolicy {
            consecutive: 100,
            ..policy()
        });
        for _ in 0..5 {
            breaker.record(true, t0);
        }
        let later = t0 + Duration::from_secs(11);
        for _ in 0..9 {
            assert_eq!(breaker.record(false, later), None);
        }
    }

    #[test]
    fn permanent_failures_and_results_while_open_change_nothing() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy());
        for _ in 0..3 {
            breaker.record(true, t0);
        }
        assert_eq!(
            breaker.record(false, t0),
            None,
            "a success of a task started before it opened"
        );
        assert_eq!(breaker.state(), State::Open);
    }

    #[test]
    fn policies_parse_and_bad_ones_say_what_is_wrong() {
        let (task_type, parsed) = BreakerPolicy::parse(
            "payment.charge:consecutive=4,open_for=5s,failure_rate=0.25,probes=2",
        )
        .unwrap();
        assert_eq!(task_type, "payment.charge");
        assert_eq!(
            parsed,
            BreakerPolicy {
                consecutive: 4,
                failure_rate: 0.25,
                open_for: Duration::from_secs(5),
                probes: 2,
                ..BreakerPolicy::default()
            }
        );
        assert_eq!(
            BreakerPolicy::parse("a").unwrap().1,
            BreakerPolicy::default()
        );
        for (spec, says) in [
            ("", "task type first"),
            ("a:consecutive=0", "whole number from 1"),
            ("a:failure_rate=1.5", "at most 1"),
            ("a:failure_rate=NaN", "at most 1"),
            ("a:open_for=2d", "to 1h"),
            ("a:colour=red", "unknown setting `colour`"),
            ("a:consecutive", "not KEY=VALUE"),
        ] {
            let error = BreakerPolicy::parse(spec).unwrap_err();
            assert!(error.contains(says), "{spec}: {error}");
        }
    }

    #[test]
    fn unknown_types_always_run() {
        let breakers = Breakers::new(HashMap::from([("a".to_string(), policy())]));
        assert!(breakers.may_start("b"));
        assert_eq!(breakers.state("b"), State::Closed);
    }

    proptest! {
        /// Whatever the outcomes and times, the window's bookkeeping stays consistent and bounded, and an open
        /// breaker lets nothing start.
        #[test]
        fn the_state_stays_consistent(events in proptest::collection::vec((any::<bool>(), 0u64..3_000, any::<bool>()), 0..400)) {
            let mut breaker = Breaker::new(policy());
            let mut now = Instant::now();
            for (failed, advance_ms, start) in events {
                now += Duration::from_millis(advance_ms);
                breaker.tick(now);
                if start && breaker.may_start() {
                    breaker.started();
                }
                breaker.record(failed, now);
                let failures = breaker.calls.iter().filter(|(_, f)| *f).count();
                prop_assert_eq!(failures, breaker.failures_in_window);
                prop_assert!(breaker.calls.len() <= MAX_WINDOW_CALLS);
                if breaker.state() == State::Open {
                    prop_assert!(!breaker.may_start());
                }
                if breaker.state() != State::Closed {
                    prop_assert!(breaker.calls.is_empty());
                }
            }
        }
    }
}
