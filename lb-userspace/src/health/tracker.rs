//! The per-target state machine. Pure: the caller passes the time of each observation, so rise,
//! fall, flapping and since-when are unit-tested without sleeping.

use std::time::Instant;

use super::{State, Thresholds};

/// The most recent failed check of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, e.g. "connect: connection refused", "HTTP 503".
    pub reason: String,
    pub at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Transition {
    pub from: State,
    pub to: State,
}

/// Hysteresis over check outcomes: `rise` consecutive successes make a target up, `fall`
/// consecutive failures make it down, anything less keeps the current state.
#[derive(Clone, Debug)]
pub(super) struct Tracker {
    thresholds: Thresholds,
    state: State,
    /// When `state` was entered (creation for `Unknown`).
    since: Instant,
    successes: u32,
    failures: u32,
    last_failure: Option<Failure>,
}

impl Tracker {
    pub fn new(thresholds: Thresholds, now: Instant) -> Self {
        Self {
            thresholds,
            state: State::Unknown,
            since: now,
            successes: 0,
            failures: 0,
            last_failure: None,
        }
    }

    /// A tracker that starts down, as the previous run left the backend: it takes `rise`
    /// successes, not one, before the backend gets new flows again.
    pub fn presumed_down(thresholds: Thresholds, now: Instant, reason: &str) -> Self {
        Self {
            state: State::Down,
            last_failure: Some(Failure {
                reason: reason.to_owned(),
                at: now,
            }),
            ..Self::new(thresholds, now)
        }
    }

    /// Feeds one check outcome observed at `now`; returns the transition it caused, if any.
    pub fn observe(&mut self, now: Instant, outcome: Result<(), &str>) -> Option<Transition> {
        // A threshold of 0 would make a single observation flip the state both ways; treat it as
        // 1 (config validation should reject it anyway).
        let (next, reached) = match outcome {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                (State::Up, self.successes >= self.thresholds.rise.max(1))
            }
            Err(reason) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                match &mut self.last_failure {
                    // A target that stays down fails the same way every interval: reuse the string.
                    Some(last) if last.reason == reason => last.at = now,
                    last => {
                        *last = Some(Failure {
                            reason: reason.to_owned(),
                            at: now,
                        })
                    }
                }
                (State::Down, self.failures >= self.thresholds.fall.max(1))
            }
        };
        if !reached || self.state == next {
            return None;
        }
        let from = std::mem::replace(&mut self.state, next);
        self.since = now;
        Some(Transition { from, to: next })
    }

    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn last_failure(&self) -> Option<&Failure> {
        self.last_failure.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A controllable clock: every call moves time forward by one interval.
    struct Clock {
        now: Instant,
    }

    impl Clock {
        fn new() -> Self {
            Self {
                now: Instant::now(),
            }
        }

        fn tick(&mut self) -> Instant {
            self.now += Duration::from_secs(1);
            self.now
        }
    }

    fn tracker(rise: u32, fall: u32, clock: &Clock) -> Tracker {
        Tracker::new(Thresholds { rise, fall }, clock.now)
    }

    fn up(from: State) -> Option<Transition> {
        Some(Transition {
            from,
            to: State::Up,
        })
    }

    fn down(from: State) -> Option<Transition> {
        Some(Transition {
            from,
            to: State::Down,
        })
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let mut clock = Clock::new();
        let mut t = tracker(2, 3, &clock);
        assert_eq!(t.state(), State::Unknown);
        assert_eq!(t.observe(clock.tick(), Ok(())), None);
        assert_eq!(t.observe(clock.tick(), Ok(())), up(State::Unknown));
        assert_eq!(t.observe(clock.tick(), Ok(())), None, "already up");
        assert_eq!(t.observe(clock.tick(), Err("refused")), None);
        assert_eq!(t.observe(clock.tick(), Err("refused")), None);
        assert_eq!(t.observe(clock.tick(), Err("refused")), down(State::Up));
        assert_eq!(
            t.observe(clock.tick(), Err("refused")),
            None,
            "already down"
        );
        assert_eq!(t.observe(clock.tick(), Ok(())), None);
        assert_eq!(t.observe(clock.tick(), Ok(())), up(State::Down));
        assert_eq!(t.state(), State::Up);
    }

    #[test]
    fn unknown_goes_down_after_fall_failures() {
        let mut clock = Clock::new();
        let mut t = tracker(2, 3, &clock);
        assert_eq!(t.observe(clock.tick(), Err("x")), None);
        assert_eq!(t.observe(clock.tick(), Err("x")), None);
        assert_eq!(t.state(), State::Unknown);
        assert_eq!(t.observe(clock.tick(), Err("x")), down(State::Unknown));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut clock = Clock::new();
        let mut t = tracker(1, 3, &clock);
        t.observe(clock.tick(), Ok(()));
        for _ in 0..10 {
            assert_eq!(t.observe(clock.tick(), Err("x")), None);
            assert_eq!(t.observe(clock.tick(), Err("x")), None);
            assert_eq!(t.observe(clock.tick(), Ok(())), None);
        }
        assert_eq!(t.state(), State::Up);
    }

    #[test]
    fn flapping_never_transitions() {
        for (rise, fall) in [(2, 2), (2, 3), (3, 2), (5, 5)] {
            for start in [State::Unknown, State::Up, State::Down] {
                let mut clock = Clock::new();
                let mut t = tracker(rise, fall, &clock);
                let settle = match start {
                    State::Unknown => 0,
                    State::Up => rise,
                    State::Down => fall,
                };
                for _ in 0..settle {
                    let outcome = if start == State::Up { Ok(()) } else { Err("x") };
                    t.observe(clock.tick(), outcome);
                }
                assert_eq!(t.state(), start);
                let since = t.since();
                for i in 0..100 {
                    let outcome = if i % 2 == 0 { Err("x") } else { Ok(()) };
                    assert_eq!(
                        t.observe(clock.tick(), outcome),
                        None,
                        "{rise}/{fall} {start}"
                    );
                }
                assert_eq!((t.state(), t.since()), (start, since));
            }
        }
    }

    #[test]
    fn timeouts_count_as_failures_and_the_reason_is_kept() {
        let mut clock = Clock::new();
        let mut t = tracker(1, 2, &clock);
        t.observe(clock.tick(), Ok(()));
        t.observe(clock.tick(), Err("connect: connection refused"));
        let at = clock.tick();
        assert_eq!(t.observe(at, Err("connect: timeout")), down(State::Up));
        assert_eq!(
            t.last_failure(),
            Some(&Failure {
                reason: "connect: timeout".into(),
                at
            })
        );
        // The last failure survives recovery, for status output.
        assert_eq!(t.observe(clock.tick(), Ok(())), up(State::Down));
        assert_eq!(
            t.last_failure().map(|f| (f.reason.as_str(), f.at)),
            Some(("connect: timeout", at))
        );
        // The same reason again only moves its time.
        let later = clock.tick();
        t.observe(later, Err("connect: timeout"));
        assert_eq!(t.last_failure().map(|f| f.at), Some(later));
    }

    #[test]
    fn since_changes_only_on_transitions() {
        let mut clock = Clock::new();
        let created = clock.now;
        let mut t = tracker(2, 2, &clock);
        t.observe(clock.tick(), Ok(()));
        assert_eq!(t.since(), created);
        let became_up = clock.tick();
        t.observe(became_up, Ok(()));
        assert_eq!(t.since(), became_up);
        t.observe(clock.tick(), Ok(()));
        t.observe(clock.tick(), Err("x"));
        t.observe(clock.tick(), Ok(()));
        assert_eq!(t.since(), became_up);
        t.observe(clock.tick(), Err("x"));
        let became_down = clock.tick();
        t.observe(became_down, Err("x"));
        assert_eq!((t.state(), t.since()), (State::Down, became_down));
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut clock = Clock::new();
        let mut t = tracker(0, 0, &clock);
        assert_eq!(t.observe(clock.tick(), Ok(())), up(State::Unknown));
        assert_eq!(t.observe(clock.tick(), Err("x")), down(State::Up));
    }
}
