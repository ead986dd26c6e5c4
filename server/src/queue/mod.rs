//! The one work queue every kind of heavy work runs on: generations, style trainings,
//! negative-prompt optimisations and blend bakes are each a [`Task`] (a request in its
//! status, a status type, and [`Task::run`] with progress and cancellation); the queue
//! gives all of them the same behaviour, decided here once:
//!
//! - **bounded**: at most [`Task::MAX_WAITING`] tasks of a kind wait; one more is refused
//!   with [`QueueError::Full`] (503);
//! - **positions**: every waiting task knows its place (`Queued { position }`, 1 is next);
//! - **status**: [`Queue::status`], [`Queue::subscribe`] (a `watch` channel, which the HTTP
//!   side turns into SSE), [`Queue::list`] (newest first), [`Queue::cancel`] (a waiting task
//!   leaves at once, a running one stops at its next step), [`Queue::resume`] for kinds that
//!   can continue;
//! - **records**: every change that matters is written through a [`Store`] (one JSON file
//!   per task by default, atomically), so a restarted studio lists every task; one that did
//!   not end comes back through [`Task::set_interrupted`] (stopped-and-resumable where the
//!   kind can resume, failed with a message otherwise); ended tasks beyond
//!   [`Task::KEEP_ENDED`] are forgotten oldest first;
//! - **who runs when** ([`Workers`]): two lanes, each one worker thread. The *interactive*
//!   lane (generations, bakes) runs one task at a time, lowest [`Task::PRIORITY`] first, then
//!   in arrival order. The *long* lane (trainings, optimisations) runs one task at a time in
//!   arrival order across kinds; a long task calls [`Ctx::wait_turn`] between steps and pauses
//!   there while interactive work waits or runs, so a generation never waits behind an hour
//!   of training and the CPU is not split between them;
//! - **one shutdown** ([`Workers::begin_shutdown`], then [`Workers::join`]): waiting tasks
//!   are marked interrupted, running ones are asked to stop (a training writes a checkpoint);
//! - **a panicking task** fails with [`Task::set_crashed`] and the worker goes on.
//!
//! The seams for running elsewhere: a [`Store`] can be a shared database, and a task's
//! status is plain serde data, so remote workers can take and report tasks later; the
//! in-process [`JsonDir`] store and threads here are the embedded default.

pub mod store;

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use crate::monitoring::metrics;
pub use store::{JsonDir, Layout, Store, StoreError};

/// Which worker runs a kind of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Short work someone is watching (generations, bakes): goes first.
    Interactive,
    /// Long work (trainings, optimisations): one at a time, pausing for interactive work.
    Long,
}

/// Where a task is in its life, as the queue sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Running,
    /// Done, failed, cancelled or stopped: the queue will not run it unless resumed.
    Ended,
}

/// One kind of work. The status holds everything that is shown and persisted (including
/// the request, where the kind can resume); `Input` is what only the first run needs and
/// is not persisted (decoded images, admission decisions).
pub trait Task: Send + Sync + 'static {
    type Input: Send + 'static;
    type Status: Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What a task of this kind is called in messages ("job", "training").
    const NOUN: &'static str;
    const LANE: Lane;
    /// Within a lane, lower runs first.
    const PRIORITY: u8 = 0;
    /// Most tasks of this kind that may wait at once.
    const MAX_WAITING: usize;
    /// Ended tasks kept (older ones are forgotten with their record); `None` keeps all.
    const KEEP_ENDED: Option<usize> = None;

    fn id(status: &Self::Status) -> &str;
    fn phase(status: &Self::Status) -> Phase;
    /// Waiting at `position` (1 is next).
    fn set_waiting(status: &mut Self::Status, position: usize);
    /// Picked by a worker, about to run (`input` is `None` for a resumed task).
    fn set_started(status: &mut Self::Status, input: Option<&Self::Input>);
    /// Cancelled while waiting.
    fn set_cancelled(status: &mut Self::Status);
    /// Asked to stop while running; the run ends it.
    fn set_stopping(_status: &mut Self::Status) {}
    /// The studio stopped before the task ended (at shutdown for waiting tasks, at the next
    /// start for any record that had not ended).
    fn set_interrupted(status: &mut Self::Status);
    /// The run panicked, or returned without ending the task.
    fn set_crashed(status: &mut Self::Status, message: &str);
    /// Whether [`Queue::resume`] may queue this ended task again.
    fn can_resume(_status: &Self::Status) -> bool {
        false
    }
    /// Does the work, reporting through `ctx`, and ends the task (a status whose phase is
    /// [`Phase::Ended`]). `input` is `None` for a resumed task.
    fn run(&self, input: Option<Self::Input>, ctx: &mut Ctx<'_, Self>)
    where
        Self: Sized;
    /// Nothing waits in this task's lane: a chance to free cached models.
    fn idle(&self) {}
    /// The queue forgot this ended task (beyond [`Task::KEEP_ENDED`]): remove its files.
    fn forgotten(&self, _status: &Self::Status) {}
}

/// Why the queue refused a call.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no {noun} with id {id:?}")]
    NotFound { noun: &'static str, id: String },
    #[error("the {noun} queue is full ({waiting} waiting); try again later")]
    Full { noun: &'static str, waiting: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The call needs an ended task (remove) or a resumable one (resume).
    #[error("the {noun} is {state}")]
    WrongState { noun: &'static str, state: &'static str },
    #[error("cannot save the {noun}'s record: {source}")]
    Store { noun: &'static str, source: StoreError },
}

impl From<QueueError> for crate::ApiError {
    fn from(e: QueueError) -> Self {
        use crate::ApiError;
        match e {
            QueueError::NotFound { noun, id } => ApiError::NotFound { what: noun, id },
            QueueError::Full { noun, waiting } => ApiError::QueueFull { noun, waiting },
            QueueError::ShuttingDown => ApiError::Unavailable("the server is shutting down".into()),
            QueueError::WrongState { .. } => ApiError::Invalid { field: "state".into(), message: e.to_string() },
            QueueError::Store { source, .. } if source.is_disk_full() => {
                ApiError::Unavailable(format!("the server's disk is full ({source}); free some space and try again"))
            }
            QueueError::Store { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

struct Entry<T: Task> {
    status: watch::Sender<T::Status>,
    cancel: Arc<AtomicBool>,
    input: Option<T::Input>,
    /// Creation order, for listing.
    order: u64,
    /// Arrival order in the lane (set when queued or resumed).
    ticket: u64,
    /// When it was queued or resumed (for `atelier_queue_wait_seconds`).
    queued_at: Instant,
}

struct State<T: Task> {
    entries: HashMap<String, Entry<T>>,
    waiting: VecDeque<String>,
    ended: VecDeque<String>,
    shutdown: bool,
}

struct Inner<T: Task> {
    task: T,
    store: Box<dyn Store<T::Status>>,
    state: Mutex<State<T>>,
    pool: Arc<Pool>,
}

impl<T: Task> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, status: &T::Status) -> Result<(), QueueError> {
        self.store.save(T::id(status), status).map_err(|source| QueueError::Store { noun: T::NOUN, source })
    }

    /// Saves, logging a failure: for changes the task cannot take back (progress, ends).
    fn save_or_log(&self, status: &T::Status) {
        if let Err(e) = self.save(status) {
            tracing::error!(id = T::id(status), error = %e, "cannot save a task record");
        }
    }

    fn not_found(id: &str) -> QueueError {
        QueueError::NotFound { noun: T::NOUN, id: id.to_string() }
    }

    /// Publishes how many tasks wait (`atelier_queue_length`).
    fn publish_length(state: &State<T>) {
        metrics::set_queue_length(T::NOUN, state.waiting.len());
    }

    /// Tells every waiting task its place.
    fn renumber(state: &State<T>) {
        for (i, id) in state.waiting.iter().enumerate() {
            if let Some(e) = state.entries.get(id) {
                send_if_changed(&e.status, |s| T::set_waiting(s, i + 1));
            }
        }
    }

    /// Records `id` as ended and forgets the oldest ended tasks beyond the limit.
    fn ended(&self, state: &mut State<T>, id: &str) {
        state.ended.retain(|e| e != id);
        state.ended.push_back(id.to_string());
        if let Some(keep) = T::KEEP_ENDED {
            while state.ended.len() > keep {
                let Some(old) = state.ended.pop_front() else { break };
                if let Some(entry) = state.entries.remove(&old) {
                    self.task.forgotten(&entry.status.borrow());
                }
                if let Err(e) = self.store.remove(&old) {
                    tracing::warn!(id = %old, error = %e, "cannot remove an old task record");
                }
            }
        }
    }
}

/// A queue of one kind of task. Cheap to clone.
pub struct Queue<T: Task> {
    inner: Arc<Inner<T>>,
}

impl<T: Task> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<T: Task> Queue<T> {
    /// Opens the queue over `store` (listing earlier tasks; those that had not ended come
    /// back interrupted) and hands it to `workers`.
    pub fn open(task: T, store: impl Store<T::Status>, workers: &Workers) -> Result<Self, QueueError> {
        let loaded = store.load().map_err(|source| QueueError::Store { noun: T::NOUN, source })?;
        let inner = Arc::new(Inner {
            task,
            store: Box::new(store),
            state: Mutex::new(State { entries: HashMap::new(), waiting: VecDeque::new(), ended: VecDeque::new(), shutdown: false }),
            pool: workers.pool.clone(),
        });
        {
            let mut state = inner.lock();
            for mut status in loaded {
                if T::phase(&status) != Phase::Ended {
                    T::set_interrupted(&mut status);
                    inner.save_or_log(&status);
                }
                let id = T::id(&status).to_string();
                let (tx, _) = watch::channel(status);
                let order = workers.pool.next_ticket();
                state.entries.insert(id.clone(), Entry { status: tx, cancel: Arc::new(AtomicBool::new(false)), input: None, order, ticket: order, queued_at: Instant::now() });
                inner.ended(&mut state, &id);
            }
            Inner::<T>::publish_length(&state);
        }
        workers.pool.register(inner.clone());
        Ok(Self { inner })
    }

    /// The task kind (its settings and services).
    pub fn task(&self) -> &T {
        &self.inner.task
    }

    /// Queues a new task. `status` carries its id and request; the queue sets its position
    /// and writes its record first, so a task is never accepted without one.
    pub fn submit(&self, status: T::Status, input: Option<T::Input>) -> Result<T::Status, QueueError> {
        self.submit_unless(status, input, |_| None)
    }

    /// [`Queue::submit`], unless `conflict` finds a reason in a task already known (checked
    /// under the queue's lock, so two submits cannot both pass).
    pub fn submit_unless<E: From<QueueError>>(
        &self,
        mut status: T::Status,
        input: Option<T::Input>,
        conflict: impl Fn(&T::Status) -> Option<E>,
    ) -> Result<T::Status, E> {
        let id = T::id(&status).to_string();
        let mut state = self.inner.lock();
        if let Some(e) = state.entries.values().find_map(|e| conflict(&e.status.borrow())) {
            return Err(e);
        }
        if state.shutdown {
            return Err(QueueError::ShuttingDown.into());
        }
        if state.waiting.len() >= T::MAX_WAITING {
            return Err(QueueError::Full { noun: T::NOUN, waiting: state.waiting.len() }.into());
        }
        T::set_waiting(&mut status, state.waiting.len() + 1);
        self.inner.save(&status)?;
        let ticket = self.inner.pool.next_ticket();
        let (tx, _) = watch::channel(status.clone());
        state.entries.insert(id.clone(), Entry { status: tx, cancel: Arc::new(AtomicBool::new(false)), input, order: ticket, ticket, queued_at: Instant::now() });
        state.waiting.push_back(id.clone());
        Inner::<T>::publish_length(&state);
        drop(state);
        tracing::info!(kind = T::NOUN, id = %id, "queued");
        self.inner.pool.notify();
        Ok(status)
    }

    /// The current status of a task.
    pub fn status(&self, id: &str) -> Result<T::Status, QueueError> {
        let state = self.inner.lock();
        let entry = state.entries.get(id).ok_or_else(|| Inner::<T>::not_found(id))?;
        let status = entry.status.borrow().clone();
        Ok(status)
    }

    /// A receiver that sees every later status change of a task.
    pub fn subscribe(&self, id: &str) -> Result<watch::Receiver<T::Status>, QueueError> {
        let state = self.inner.lock();
        Ok(state.entries.get(id).ok_or_else(|| Inner::<T>::not_found(id))?.status.subscribe())
    }

    /// Every task of this kind, newest first.
    pub fn list(&self) -> Vec<T::Status> {
        let state = self.inner.lock();
        let mut all: Vec<(u64, T::Status)> = state.entries.values().map(|e| (e.order, e.status.borrow().clone())).collect();
        all.sort_by(|a, b| b.0.cmp(&a.0));
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// Cancels a task: a waiting one ends at once ([`Task::set_cancelled`]), a running one
    /// is asked to stop at its next step ([`Task::set_stopping`]); an ended one is left as
    /// it is. Returns the status after the request.
    pub fn cancel(&self, id: &str) -> Result<T::Status, QueueError> {
        let mut state = self.inner.lock();
        let entry = state.entries.get_mut(id).ok_or_else(|| Inner::<T>::not_found(id))?;
        let phase = T::phase(&entry.status.borrow());
        let changed = match phase {
            Phase::Waiting => {
                entry.cancel.store(true, Ordering::SeqCst);
                entry.input = None;
                entry.status.send_modify(T::set_cancelled);
                state.waiting.retain(|w| w != id);
                self.inner.ended(&mut state, id);
                Inner::<T>::renumber(&state);
                Inner::<T>::publish_length(&state);
                tracing::info!(kind = T::NOUN, id = %id, "cancelled while waiting");
                true
            }
            Phase::Running => {
                entry.cancel.store(true, Ordering::SeqCst);
                tracing::info!(kind = T::NOUN, id = %id, "stopping at the next step");
                send_if_changed(&entry.status, T::set_stopping)
            }
            Phase::Ended => false,
        };
        let status = state.entries.get(id).map(|e| e.status.borrow().clone()).ok_or_else(|| Inner::<T>::not_found(id))?;
        drop(state);
        if changed {
            self.inner.save_or_log(&status);
            self.inner.pool.notify();
        }
        Ok(status)
    }

    /// Queues an ended task again, where [`Task::can_resume`] allows; it runs with no input.
    pub fn resume(&self, id: &str, change: impl FnOnce(&mut T::Status)) -> Result<T::Status, QueueError> {
        let mut state = self.inner.lock();
        if state.shutdown {
            return Err(QueueError::ShuttingDown);
        }
        let waiting = state.waiting.len();
        let entry = state.entries.get_mut(id).ok_or_else(|| Inner::<T>::not_found(id))?;
        let current = entry.status.borrow().clone();
        if T::phase(&current) != Phase::Ended || !T::can_resume(&current) {
            return Err(QueueError::WrongState { noun: T::NOUN, state: phase_word(T::phase(&current)) });
        }
        if waiting >= T::MAX_WAITING {
            return Err(QueueError::Full { noun: T::NOUN, waiting });
        }
        let mut status = current;
        T::set_waiting(&mut status, waiting + 1);
        change(&mut status);
        self.inner.save(&status)?;
        entry.cancel.store(false, Ordering::SeqCst);
        entry.ticket = self.inner.pool.next_ticket();
        entry.queued_at = Instant::now();
        entry.status.send_replace(status.clone());
        state.ended.retain(|e| e != id);
        state.waiting.push_back(id.to_string());
        Inner::<T>::publish_length(&state);
        drop(state);
        self.inner.pool.notify();
        Ok(status)
    }

    /// Forgets an ended task and its record; returns its last status.
    pub fn remove(&self, id: &str) -> Result<T::Status, QueueError> {
        let mut state = self.inner.lock();
        let entry = state.entries.get(id).ok_or_else(|| Inner::<T>::not_found(id))?;
        let status = entry.status.borrow().clone();
        let phase = T::phase(&status);
        if phase != Phase::Ended {
            return Err(QueueError::WrongState { noun: T::NOUN, state: phase_word(phase) });
        }
        state.entries.remove(id);
        state.ended.retain(|e| e != id);
        drop(state);
        self.inner.store.remove(id).map_err(|source| QueueError::Store { noun: T::NOUN, source })?;
        Ok(status)
    }
}

/// Applies `change` and tells watchers only if the status really changed.
fn send_if_changed<S: Clone + PartialEq>(tx: &watch::Sender<S>, change: impl FnOnce(&mut S)) -> bool {
    tx.send_if_modified(|s| {
        let before = s.clone();
        change(s);
        *s != before
    })
}

fn phase_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Waiting => "waiting",
        Phase::Running => "running",
        Phase::Ended => "ended",
    }
}

/// What a running task reports through.
pub struct Ctx<'a, T: Task> {
    inner: &'a Inner<T>,
    status: watch::Sender<T::Status>,
    cancel: Arc<AtomicBool>,
}

impl<T: Task> Ctx<'_, T> {
    /// The task's current status.
    pub fn status(&self) -> T::Status {
        self.status.borrow().clone()
    }

    /// Changes and publishes the status (watchers see it at once; not written to disk).
    pub fn update(&self, change: impl FnOnce(&mut T::Status)) {
        self.status.send_modify(change);
    }

    /// [`Ctx::update`], then writes the record.
    pub fn save(&self, change: impl FnOnce(&mut T::Status)) {
        self.status.send_modify(change);
        let status = self.status.borrow().clone();
        self.inner.save_or_log(&status);
    }

    /// Whether the task was asked to stop (cancel, or the studio shutting down).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The flag behind [`Ctx::is_cancelled`], for code that takes an `AtomicBool`.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }

    /// For long tasks, between steps: waits while interactive work waits or runs (returns
    /// at once when cancelled), calling `on_pause` first (to say so in the status).
    /// Returns whether it paused. Interactive tasks never wait here.
    pub fn wait_turn(&self, on_pause: impl FnOnce()) -> bool {
        T::LANE == Lane::Long && self.inner.pool.wait_for_interactive(&self.cancel, on_pause)
    }

    /// Whether the studio is shutting down (a cancel then is an interruption, not the
    /// user's choice).
    pub fn is_shutting_down(&self) -> bool {
        self.inner.lock().shutdown
    }
}

/// The work a worker picked: runs one task to its end.
type Job = Box<dyn FnOnce() + Send>;

/// A queue as the workers see it, whatever its kind.
trait Source: Send + Sync {
    fn lane(&self) -> Lane;
    /// (priority, ticket) of the next waiting task.
    fn head(&self) -> Option<(u8, u64)>;
    /// Pops the next waiting task, marks it running and returns its run.
    fn take(self: Arc<Self>) -> Option<Job>;
    fn begin_shutdown(&self);
    fn idle(&self);
}

impl<T: Task> Source for Inner<T> {
    fn lane(&self) -> Lane {
        T::LANE
    }

    fn head(&self) -> Option<(u8, u64)> {
        let state = self.lock();
        let id = state.waiting.front()?;
        Some((T::PRIORITY, state.entries.get(id)?.ticket))
    }

    fn take(self: Arc<Self>) -> Option<Job> {
        let mut state = self.lock();
        if state.shutdown {
            return None;
        }
        let id = state.waiting.pop_front()?;
        let entry = state.entries.get_mut(&id)?;
        metrics::queue_waited(T::NOUN, entry.queued_at.elapsed());
        let input = entry.input.take();
        // Marked running under the lock, so a cancel never sees a picked task as waiting.
        entry.status.send_modify(|s| T::set_started(s, input.as_ref()));
        let (tx, cancel) = (entry.status.clone(), entry.cancel.clone());
        let started = tx.borrow().clone();
        Inner::<T>::renumber(&state);
        Inner::<T>::publish_length(&state);
        drop(state);
        self.save_or_log(&started);
        let inner = self;
        Some(Box::new(move || {
            tracing::info!(kind = T::NOUN, id = %id, "started");
            let began = std::time::Instant::now();
            let mut ctx = Ctx { inner: &inner, status: tx.clone(), cancel };
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| inner.task.run(input, &mut ctx)));
            match outcome {
                Err(_) => {
                    tracing::error!(kind = T::NOUN, id = %id, "the task panicked");
                    tx.send_modify(|s| T::set_crashed(s, &format!("the {} crashed; see the server log", T::NOUN)));
                }
                Ok(()) if T::phase(&tx.borrow()) != Phase::Ended => {
                    tracing::error!(kind = T::NOUN, id = %id, "the task returned without ending");
                    tx.send_modify(|s| T::set_crashed(s, &format!("the {} stopped without a result; see the server log", T::NOUN)));
                }
                Ok(()) => {}
            }
            let last = tx.borrow().clone();
            inner.save_or_log(&last);
            let mut state = inner.lock();
            inner.ended(&mut state, &id);
            tracing::info!(kind = T::NOUN, id = %id, elapsed = ?began.elapsed(), "ended");
        }))
    }

    fn begin_shutdown(&self) {
        let mut state = self.lock();
        state.shutdown = true;
        let waiting: Vec<String> = state.waiting.drain(..).collect();
        Self::publish_length(&state);
        let mut interrupted = Vec::new();
        for (id, entry) in &state.entries {
            entry.cancel.store(true, Ordering::SeqCst);
            if waiting.contains(id) {
                entry.status.send_modify(T::set_interrupted);
                interrupted.push(entry.status.borrow().clone());
            }
        }
        for id in &waiting {
            self.ended(&mut state, id);
        }
        drop(state);
        for status in interrupted {
            self.save_or_log(&status);
        }
    }

    fn idle(&self) {
        self.task.idle();
    }
}

struct PoolState {
    sources: Vec<Weak<dyn Source>>,
    shutdown: bool,
    interactive_running: usize,
}

/// What the workers and every queue share.
struct Pool {
    state: Mutex<PoolState>,
    wake: Condvar,
    tickets: AtomicU64,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::SeqCst)
    }

    fn register(&self, source: Arc<dyn Source>) {
        let shutdown = {
            let mut state = self.lock();
            state.sources.push(Arc::downgrade(&source));
            state.shutdown
        };
        if shutdown {
            source.begin_shutdown();
        }
        self.notify();
    }

    /// Wakes the workers (something was queued, cancelled or ended).
    fn notify(&self) {
        let _state = self.lock();
        self.wake.notify_all();
    }

    fn sources(state: &PoolState, lane: Lane) -> Vec<Arc<dyn Source>> {
        state.sources.iter().filter_map(Weak::upgrade).filter(|s| s.lane() == lane).collect()
    }

    fn interactive_busy(state: &PoolState) -> bool {
        state.interactive_running > 0 || Self::sources(state, Lane::Interactive).iter().any(|s| s.head().is_some())
    }

    /// Waits while interactive work waits or runs; calls `on_pause` once before waiting.
    /// Returns whether it waited.
    fn wait_for_interactive(&self, cancel: &AtomicBool, on_pause: impl FnOnce()) -> bool {
        let busy = |state: &PoolState| !state.shutdown && !cancel.load(Ordering::SeqCst) && Self::interactive_busy(state);
        if !busy(&self.lock()) {
            return false;
        }
        on_pause();
        let mut state = self.lock();
        while busy(&state) {
            state = self.wake.wait_timeout(state, Duration::from_millis(250)).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    fn worker(&self, lane: Lane) {
        let mut told_idle = false;
        loop {
            let job = {
                let mut state = self.lock();
                loop {
                    if state.shutdown {
                        return;
                    }
                    let sources = Self::sources(&state, lane);
                    let next = sources.iter().filter_map(|s| s.head().map(|h| (h, s.clone()))).min_by_key(|(h, _)| *h);
                    if let Some((_, source)) = next {
                        if let Some(job) = source.take() {
                            if lane == Lane::Interactive {
                                state.interactive_running += 1;
                            }
                            break job;
                        }
                        continue;
                    }
                    if !told_idle {
                        sources.iter().for_each(|s| s.idle());
                        told_idle = true;
                    }
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
            };
            told_idle = false;
            job();
            let mut state = self.lock();
            if lane == Lane::Interactive {
                state.interactive_running -= 1;
            }
            drop(state);
            self.wake.notify_all();
        }
    }
}

/// The worker threads, one per [`Lane`], shared by every queue of a studio. Dropping the
/// last handle shuts down and joins them.
pub struct Workers {
    pool: Arc<Pool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Workers {
    /// Starts the two workers.
    pub fn start() -> Arc<Self> {
        let pool = Arc::new(Pool {
            state: Mutex::new(PoolState { sources: Vec::new(), shutdown: false, interactive_running: 0 }),
            wake: Condvar::new(),
            tickets: AtomicU64::new(0),
        });
        let threads = [(Lane::Interactive, "atelier-interactive"), (Lane::Long, "atelier-long")]
            .into_iter()
            .map(|(lane, name)| {
                let pool = pool.clone();
                std::thread::Builder::new().name(name.into()).spawn(move || pool.worker(lane)).expect("spawning a worker thread")
            })
            .collect();
        Arc::new(Self { pool, threads: Mutex::new(threads) })
    }

    /// Stops taking tasks: waiting tasks are marked interrupted, running ones asked to stop.
    /// Does not wait; [`Workers::join`] does.
    pub fn begin_shutdown(&self) {
        let sources: Vec<Arc<dyn Source>> = {
            let mut state = self.pool.lock();
            state.shutdown = true;
            state.sources.iter().filter_map(Weak::upgrade).collect()
        };
        for source in sources {
            source.begin_shutdown();
        }
        self.pool.notify();
    }

    /// [`Workers::begin_shutdown`], then waits for the running tasks to end.
    pub fn join(&self) {
        self.begin_shutdown();
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests;
