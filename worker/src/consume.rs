//! The consume loop and the group membership it keeps: it polls the consumer all the time — queueing records
//! behind busy permits, pausing the assigned partitions once a permit's worth is queued and resuming them when
//! the queue is down to half, so a slow handler never makes the worker miss `max.poll.interval.ms` and memory
//! stays bounded — hands records to tasks, commits finished offsets every 100 ms (async, in
//! order per partition, never above an unfinished task), and on revocation commits what its partitions finished
//! synchronously before the group moves them, then forgets them. It also runs the shutdown sequence, and carries
//! out the circuit breakers ([`crate::breaker`]): a record of a type whose breaker lets nothing start is held
//! (uncommitted, outside the queue, so other types keep flowing) and the type's partitions are paused, so that
//! its tasks wait in Kafka rather than burn their attempts; held records are its half-open probes.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edow_kafka::dead_letters::Reason;
use edow_telemetry::lag::LagReporter;
use edow_telemetry::metrics;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::breaker::{Breakers, State, Transition};
use crate::offsets::{Lease, OffsetTracker, Position};
use crate::publish::Stop;
use crate::task::{self, Outcome, TaskContext};

/// How often finished offsets are committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How long the loop may leave records in librdkafka (not polling) while its queue is full, before it pauses
/// the partitions to poll again; far below any `max.poll.interval.ms`.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

fn lock(tracker: &Mutex<OffsetTracker>) -> MutexGuard<'_, OffsetTracker> {
    tracker.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn lock_breakers(breakers: &Mutex<Breakers>) -> MutexGuard<'_, Breakers> {
    breakers.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs a breaker's change of state and shows it as `edow_circuit_state`.
pub(crate) fn report(transition: &Transition) {
    let Transition {
        task_type,
        from,
        to,
        why,
    } = transition;
    metrics::CIRCUIT_STATE
        .with_label_values(&[task_type])
        .set(to.gauge());
    let (from, to) = (from.name(), to.name());
    match transition.to {
        State::Open => {
            tracing::warn!(%task_type, from, to, "circuit breaker opened: {why}; its tasks wait in Kafka")
        }
        _ => tracing::info!(%task_type, from, to, "circuit breaker {to}: {why}"),
    }
}

/// The consumer's context: keeps the offset tracker in step with the group's assignment, and exports the
/// member's consumer lag from librdkafka's statistics.
pub struct Rebalances {
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Set on every assignment, so that the loop pauses new partitions too while saturated.
    assigned: AtomicBool,
    lag: LagReporter,
}

impl Rebalances {
    pub fn new(tracker: Arc<Mutex<OffsetTracker>>, group: &str) -> Rebalances {
        Rebalances {
            tracker,
            assigned: AtomicBool::new(false),
            lag: LagReporter::new(group),
        }
    }
}

impl ClientContext for Rebalances {
    fn stats(&self, statistics: Statistics) {
        self.lag.report(&statistics);
    }
}

impl ConsumerContext for Rebalances {
    /// Runs before the revocation is acknowledged to the group: the last moment these offsets are ours.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let mut finished = TopicPartitionList::new();
        {
            let mut tracker = lock(&self.tracker);
            for e in list.elements() {
                if let Some(next) = tracker.revoke(e.topic(), e.partition()) {
                    let _ = finished.add_partition_offset(
                        e.topic(),
                        e.partition(),
                        Offset::Offset(next),
                    );
                }
            }
        }
        if finished.count() > 0 {
            if consumer.assignment_lost() {
                // The group has already given them to someone else: committing now could move their offsets.
                tracing::warn!(
                    count = finished.count(),
                    "assignment lost: not committing the revoked partitions"
                );
            } else if let Err(e) = consumer.commit(&finished, CommitMode::Sync) {
                tracing::warn!("committing the offsets of revoked partitions: {e}");
            }
        }
        tracing::info!(count = list.count(), "partitions revoked");
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut assigned = Vec::new();
                {
                    let mut tracker = lock(&self.tracker);
                    for e in list.elements() {
                        tracker.assign(e.topic(), e.partition());
                        assigned.push(format!("{}/{}", e.topic(), e.partition()));
                    }
                }
                self.assigned.store(true, Ordering::SeqCst);
                tracing::info!(?assigned, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!("rebalance failed: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!("committing offsets: {e}; will commit them again");
            let mut tracker = lock(&self.tracker);
            for e in offsets.elements() {
                if let Offset::Offset(next) = e.offset() {
                    tracker.commit_failed(e.topic(), e.partition(), next);
                }
            }
        }
    }
}

pub type TaskConsumer = StreamConsumer<Rebalances>;

/// A record taken from the consumer, waiting for a permit.
struct Queued {
    msg: Arc<OwnedMessage>,
    position: Position,
    lease: Lease,
}

/// The loop's own state; the consumer stays apart so that a borrowed record and this can coexist.
struct Flow {
    ctx: Arc<TaskContext>,
    tracker: Arc<Mutex<OffsetTracker>>,
    permits: Arc<Semaphore>,
    concurrency: usize,
    /// Woken by every task that ends, so the loop can start queued work and resume partitions.
    finished: Arc<Notify>,
    queued: VecDeque<Queued>,
    /// Records of types whose breaker lets nothing start, oldest first.
    held: VecDeque<Queued>,
    /// Partitions this worker paused and has not resumed yet.
    paused: BTreeSet<(String, i32)>,
    /// Partitions paused for their type's breaker.
    breaker_paused: BTreeSet<(String, i32)>,
    /// The flow control resumed partitions or the assignment changed: pause the breakers' partitions again.
    repause: bool,
    /// Since when the queue has been full while nothing was paused.
    full_since: Option<Instant>,
}

/// Runs until `signal`; then drains for up to `grace`, commits what finished and leaves the group.
pub async fn run(
    consumer: TaskConsumer,
    ctx: Arc<TaskContext>,
    tracker: Arc<Mutex<OffsetTracker>>,
    concurrency: usize,
    grace: Duration,
    signal: impl Future<Output = ()>,
) {
    let mut flow = Flow {
        ctx,
        tracker,
        permits: Arc::new(Semaphore::new(concurrency)),
        concurrency,
        finished: Arc::new(Notify::new()),
        queued: VecDeque::new(),
        held: VecDeque::new(),
        paused: BTreeSet::new(),
        breaker_paused: BTreeSet::new(),
        repause: false,
        full_since: None,
    };
    let mut tick = tokio::time::interval(COMMIT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(signal);
    loop {
        for transition in lock_breakers(&flow.ctx.breakers).tick(Instant::now()) {
            report(&transition);
        }
        flow.start_queued();
        let free = flow.permits.available_permits();
        metrics::WORKER_FREE_SLOTS.set(free as i64);
        metrics::WORKER_IN_FLIGHT.set(concurrency.saturating_sub(free) as i64);
        let receive = flow.backpressure(&consumer);
        flow.enforce_breakers(&consumer);
        tokio::select! {
            _ = &mut signal => break,
            _ = tick.tick() => commit(&consumer, &flow.tracker, CommitMode::Async),
            _ = flow.finished.notified() => {}
            msg = consumer.recv(), if receive => flow.take(msg),
        }
    }
    flow.drain(&consumer, grace).await;
    commit(&consumer, &flow.tracker, CommitMode::Sync);
    consumer.unsubscribe();
    // Dropping the consumer closes it: the revocation callback commits anything finished since.
}

impl Flow {
    fn take(&mut self, msg: Result<BorrowedMessage<'_>, KafkaError>) {
        match msg {
            Ok(msg) => {
                metrics::RECORDS_CONSUMED
                    .with_label_values(&[msg.topic()])
                    .inc();
                if !self.paused.is_empty() {
                    tracing::debug!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        "a record arrived while paused; queued"
                    );
                }
                let msg = msg.detach();
                let (position, lease) =
                    lock(&self.tracker).start(msg.topic(), msg.partition(), msg.offset());
                self.queued.push_back(Queued {
                    msg: Arc::new(msg),
                    position,
                    lease,
                });
            }
            Err(e) => tracing::warn!("consuming tasks: {e}"),
        }
    }

    /// Starts held records whose breaker now lets them (oldest first: they are the probes), then queued ones,
    /// while permits are free; holds records of types whose breaker lets nothing start; drops those whose
    /// partition went elsewhere meanwhile (not started and not committed: the new owner reads them again).
    fn start_queued(&mut self) {
        let breakers = self.ctx.breakers.clone();
        let mut breakers = lock_breakers(&breakers);
        if !self.held.is_empty() {
            let mut still_held = VecDeque::with_capacity(self.held.len());
            while let Some(held) = self.held.pop_front() {
                if held.lease.is_revoked() {
                    continue;
                }
                let task_type = self.task_type(&held);
                if !breakers.may_start(&task_type) {
                    still_held.push_back(held);
                    continue;
                }
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    still_held.push_back(held);
                    continue;
                };
                breakers.started(&task_type);
                self.spawn(held, permit);
            }
            self.held = still_held;
        }
        while let Some(front) = self.queued.front() {
            if front.lease.is_revoked() {
                self.queued.pop_front();
                continue;
            }
            if !breakers.is_empty() {
                let task_type = self.task_type(front);
                if !breakers.may_start(&task_type) {
                    let held = self.queued.pop_front().expect("front exists");
                    self.held.push_back(held);
                    continue;
                }
                let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                    break;
                };
                breakers.started(&task_type);
                let queued = self.queued.pop_front().expect("front exists");
                self.spawn(queued, permit);
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            let queued = self.queued.pop_front().expect("front exists");
            self.spawn(queued, permit);
        }
    }

    fn task_type(&self, queued: &Queued) -> String {
        let topic = queued.msg.topic();
        self.ctx
            .topic_types
            .get(topic)
            .cloned()
            .unwrap_or_else(|| topic.to_string())
    }

    /// Pauses the partitions of each type whose breaker is open, or half-open with its probes in hand (held or
    /// running); resumes them once it lets tasks start again and holds none. A half-open breaker with nothing
    /// held resumes them to fetch a probe, and pauses them again once one is held, so held records stay few.
    fn enforce_breakers(&mut self, consumer: &TaskConsumer) {
        let wanted: BTreeSet<String> = {
            let breakers = lock_breakers(&self.ctx.breakers);
            breakers
                .not_closed()
                .filter(|(task_type, state)| {
                    *state == State::Open
                        || !breakers.may_start(task_type)
                        || self.held.iter().any(|h| self.task_type(h) == *task_type)
                })
                .map(|(task_type, _)| task_type.to_string())
                .collect()
        };
        let repause = std::mem::take(&mut self.repause);
        if wanted.is_empty() && self.breaker_paused.is_empty() {
            return;
        }
        let assignment = match consumer.assignment() {
            Ok(assignment) => assignment,
            Err(e) => {
                tracing::warn!("reading the assignment for the circuit breakers: {e}");
                return;
            }
        };
        let desired: BTreeSet<(String, i32)> = assignment
            .elements()
            .iter()
            .filter(|e| {
                self.ctx
                    .topic_types
                    .get(e.topic())
                    .is_some_and(|t| wanted.contains(t))
            })
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let to_pause: Vec<&(String, i32)> = if repause {
            desired.iter().collect()
        } else {
            desired.difference(&self.breaker_paused).collect()
        };
        let to_resume: Vec<(String, i32)> = self
            .breaker_paused
            .difference(&desired)
            // Paused by the flow control too: it resumes them.
            .filter(|p| !self.paused.contains(*p))
            .cloned()
            .collect();
        let list = |partitions: &mut dyn Iterator<Item = &(String, i32)>| {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in partitions {
                list.add_partition(topic, *partition);
            }
            list
        };
        if !to_pause.is_empty() {
            if let Err(e) = consumer.pause(&list(&mut to_pause.into_iter())) {
                tracing::warn!("pausing partitions for a circuit breaker: {e}");
                return;
            }
        }
        if !to_resume.is_empty() {
            if let Err(e) = consumer.resume(&list(&mut to_resume.iter())) {
                tracing::warn!("resuming partitions after a circuit breaker: {e}");
                return;
            }
        }
        self.breaker_paused = desired;
    }

    /// Flow control; returns whether to take records now. While a permit's worth of records waits (`concurrency`
    /// queued behind busy permits) the loop takes no more and leaves them in librdkafka, which stops fetching
    /// once its own queue is full: no pause, so nothing fetched ahead is thrown away. Only when the queue has
    /// stayed full for [`PAUSE_AFTER`] (slow handlers) does it pause every assigned partition (new assignments
    /// included while paused) and poll again, so that it never misses `max.poll.interval.ms`; it resumes them
    /// once the queue is down to under half. Pausing whenever the last permit was taken and resuming whenever
    /// one freed made every task a fetch round trip (librdkafka drops what it fetched ahead on pause and fetches
    /// again from the last record handed over on resume): a saturated worker crawled at about a hundred tasks a
    /// second, the partitions whose fetches answered last starved.
    /// What was paused is remembered by name: librdkafka keeps a partition paused by the application across
    /// revocation and reassignment, so resuming only the current assignment could leave a partition paused for
    /// ever once it comes back.
    fn backpressure(&mut self, consumer: &TaskConsumer) -> bool {
        let (full, resume) = thresholds(self.concurrency);
        let queued = self.queued.len();
        let reassigned = consumer.context().assigned.swap(false, Ordering::SeqCst);
        self.repause |= reassigned;
        let full_too_long = if queued >= full && self.paused.is_empty() {
            let since = *self.full_since.get_or_insert_with(Instant::now);
            since.elapsed() >= PAUSE_AFTER
        } else {
            self.full_since = None;
            false
        };
        if full_too_long || !self.paused.is_empty() && reassigned && queued >= resume {
            let paused = consumer.assignment().and_then(|a| {
                consumer.pause(&a)?;
                Ok(a)
            });
            match paused {
                Ok(list) => {
                    if self.paused.is_empty() {
                        tracing::debug!(
                            count = list.count(),
                            queued,
                            "all permits busy for {PAUSE_AFTER:?}: partitions paused"
                        );
                    }
                    self.full_since = None;
                    self.paused.extend(
                        list.elements()
                            .iter()
                            .map(|e| (e.topic().to_string(), e.partition())),
                    );
                }
                Err(e) => tracing::warn!("pausing partitions: {e}"),
            }
        } else if !self.paused.is_empty() && queued < resume {
            let resumed = consumer.assignment().and_then(|assigned| {
                let mut all = self.paused.clone();
                all.extend(
                    assigned
                        .elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition())),
                );
                let mut list = TopicPartitionList::new();
                for (topic, partition) in &all {
                    list.add_partition(topic, *partition);
                }
                consumer.resume(&list)
            });
            match resumed {
                Ok(()) => {
                    tracing::debug!(queued, "queue drained: partitions resumed");
                    self.paused.clear();
                    self.repause = true;
                }
                Err(e) => tracing::warn!("resuming partitions: {e}"),
            }
        }
        // Paused, records still arrive (those fetched before the pause): take them, to keep polling.
        self.queued.len() < full || !self.paused.is_empty()
    }

    fn spawn(&self, queued: Queued, permit: OwnedSemaphorePermit) {
        let (ctx, tracker, finished) = (
            self.ctx.clone(),
            self.tracker.clone(),
            self.finished.clone(),
        );
        tokio::spawn(async move {
            let inner = {
                let (ctx, msg, lease) = (ctx.clone(), queued.msg.clone(), queued.lease.clone());
                tokio::spawn(async move { task::process(&ctx, &msg, &lease).await })
            };
            let outcome = match inner.await {
                Ok(outcome) => outcome,
                Err(e) => {
                    // A bug in the worker itself (a handler's panic is a failure result): dead-letter the record
                    // so that its partition moves on, rather than leaving it uncommitted for ever.
                    let p = &queued.position;
                    tracing::error!(topic = %p.topic, partition = p.partition, offset = p.offset, "processing a task failed: {e}; dead-lettering it");
                    let stop = Stop {
                        lease: &queued.lease,
                        shutdown: &ctx.shutdown,
                    };
                    let reason = Reason::new(
                        "worker_panic",
                        format!("the worker failed on this record: {e}"),
                    );
                    let service = format!("worker:{}", ctx.worker_id);
                    ctx.publisher
                        .dead_letter(&queued.msg, &reason, &service, &stop)
                        .await
                        .into()
                }
            };
            if outcome == Outcome::Acknowledged {
                lock(&tracker).complete(&queued.position);
            }
            drop(permit);
            finished.notify_one();
        });
    }

    /// Stops taking work and waits up to `grace` for running tasks (their publishes keep retrying meanwhile);
    /// then abandons what is left, which stays uncommitted.
    async fn drain(&mut self, consumer: &TaskConsumer, grace: Duration) {
        self.ctx.shutdown.drain();
        self.queued.clear();
        self.held.clear();
        if let Err(e) = consumer.assignment().and_then(|a| consumer.pause(&a)) {
            tracing::warn!("pausing partitions: {e}");
        }
        let running = self.concurrency - self.permits.available_permits();
        tracing::info!(running, "shutting down: finishing running tasks");
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(COMMIT_INTERVAL);
        loop {
            tokio::select! {
                all = self.permits.acquire_many(self.concurrency as u32) => {
                    drop(all);
                    break;
                }
                _ = &mut deadline => {
                    let running = self.concurrency - self.permits.available_permits();
                    tracing::warn!(running, "tasks still running after the {grace:?} shutdown grace; abandoning them (they will be redelivered)");
                    self.ctx.shutdown.abandon();
                    break;
                }
                _ = tick.tick() => commit(consumer, &self.tracker, CommitMode::Async),
                // Keep serving the group (heartbeats, rebalances); a record still arriving is not started.
                _ = consumer.recv() => {}
            }
        }
    }
}

/// (full at, resume below) this many queued records: a permit's worth, and half of that.
fn thresholds(concurrency: usize) -> (usize, usize) {
    let pause = concurrency.max(1);
    (pause, pause.div_ceil(2))
}

fn commit(consumer: &TaskConsumer, tracker: &Mutex<OffsetTracker>, mode: CommitMode) {
    let ready = lock(tracker).take_committable();
    if ready.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), next) in &ready {
        if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::warn!("committing {topic}/{partition}: {e}");
            return;
        }
    }
    if let Err(e) = consumer.commit(&list, mode) {
        tracing::warn!("committing offsets: {e}");
        let mut tracker = lock(tracker);
        for ((topic, partition), next) in &ready {
            tracker.commit_failed(topic, *partition, *next);
        }
    }
}
