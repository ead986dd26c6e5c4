//! The queue on a fake task (no model): ordering and positions, cancel waiting and
//! running, the cap, records across a restart, shutdown mid-task, a panicking task,
//! forgetting old tasks, resume, and long tasks pausing for interactive ones.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum St {
    Queued { position: usize },
    Running,
    Stopping,
    Done,
    Cancelled,
    Stopped,
    Failed { message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Fake {
    id: String,
    #[serde(flatten)]
    state: St,
    steps: u32,
    done: u32,
    panic: bool,
}

fn fake(id: &str, steps: u32) -> Fake {
    Fake { id: id.into(), state: St::Queued { position: 0 }, steps, done: 0, panic: false }
}

/// A task of `steps` steps of 2 ms; `LONG` picks the lane. Every step is logged as
/// `ID` in the shared log, and `hold` keeps a running task at its first step.
struct FakeTask<const LONG: bool> {
    log: Arc<Mutex<Vec<String>>>,
    hold: Arc<AtomicBool>,
}

impl<const LONG: bool> Task for FakeTask<LONG> {
    type Input = ();
    type Status = Fake;
    const NOUN: &'static str = "fake";
    const LANE: Lane = if LONG { Lane::Long } else { Lane::Interactive };
    const MAX_WAITING: usize = 3;
    const KEEP_ENDED: Option<usize> = Some(4);

    fn id(s: &Fake) -> &str {
        &s.id
    }
    fn phase(s: &Fake) -> Phase {
        match s.state {
            St::Queued { .. } => Phase::Waiting,
            St::Running | St::Stopping => Phase::Running,
            _ => Phase::Ended,
        }
    }
    fn set_waiting(s: &mut Fake, position: usize) {
        s.state = St::Queued { position };
    }
    fn set_started(s: &mut Fake, _input: Option<&()>) {
        s.state = St::Running;
    }
    fn set_cancelled(s: &mut Fake) {
        s.state = St::Cancelled;
    }
    fn set_stopping(s: &mut Fake) {
        s.state = St::Stopping;
    }
    fn set_interrupted(s: &mut Fake) {
        s.state = if LONG { St::Stopped } else { St::Failed { message: "interrupted".into() } };
    }
    fn set_crashed(s: &mut Fake, message: &str) {
        s.state = St::Failed { message: message.into() };
    }
    fn can_resume(s: &Fake) -> bool {
        s.state == St::Stopped
    }
    fn run(&self, _input: Option<()>, ctx: &mut Ctx<'_, Self>) {
        let status = ctx.status();
        if status.panic {
            panic!("a fake task panics");
        }
        for step in status.done..status.steps {
            ctx.wait_turn(|| {});
            while self.hold.load(Ordering::SeqCst) && !ctx.is_cancelled() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if ctx.is_cancelled() {
                ctx.save(|s| s.state = if LONG { St::Stopped } else { St::Cancelled });
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
            self.log.lock().unwrap().push(status.id.clone());
            ctx.update(|s| s.done = step + 1);
        }
        ctx.save(|s| s.state = St::Done);
    }
}

struct Rig<const LONG: bool> {
    workers: Arc<Workers>,
    queue: Queue<FakeTask<LONG>>,
    log: Arc<Mutex<Vec<String>>>,
    hold: Arc<AtomicBool>,
}

fn rig<const LONG: bool>(dir: &std::path::Path) -> Rig<LONG> {
    let workers = Workers::start();
    let log = Arc::new(Mutex::new(Vec::new()));
    let hold = Arc::new(AtomicBool::new(false));
    let task = FakeTask::<LONG> { log: log.clone(), hold: hold.clone() };
    let queue = Queue::open(task, JsonDir::open(dir, Layout::Flat).unwrap(), &workers).unwrap();
    Rig { workers, queue, log, hold }
}

fn wait_for<T: Task>(queue: &Queue<T>, id: &str, what: impl Fn(&T::Status) -> bool) -> T::Status {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = queue.status(id).unwrap();
        if what(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting on {id}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn state<const LONG: bool>(r: &Rig<LONG>, id: &str) -> St {
    r.queue.status(id).unwrap().state
}

#[test]
fn tasks_run_in_order_with_positions_and_cancel_while_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig::<false>(tmp.path());
    r.hold.store(true, Ordering::SeqCst);
    r.queue.submit(fake("first", 1), None).unwrap();
    wait_for(&r.queue, "first", |s| s.state == St::Running);
    for id in ["a", "b", "c"] {
        r.queue.submit(fake(id, 1), None).unwrap();
    }
    assert_eq!(state(&r, "a"), St::Queued { position: 1 });
    assert_eq!(state(&r, "c"), St::Queued { position: 3 });
    // The cap: three wait, a fourth is refused.
    let full = r.queue.submit(fake("d", 1), None).unwrap_err();
    assert!(matches!(full, QueueError::Full { waiting: 3, .. }), "{full}");
    let full = crate::ApiError::from(full);
    assert_eq!(full.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.to_string(), "the fake queue is full (3 waiting); try again later");
    // Cancel while waiting: it ends at once and the others move up.
    assert_eq!(r.queue.cancel("b").unwrap().state, St::Cancelled);
    assert_eq!(state(&r, "c"), St::Queued { position: 2 });
    r.hold.store(false, Ordering::SeqCst);
    wait_for(&r.queue, "c", |s| s.state == St::Done);
    assert_eq!(*r.log.lock().unwrap(), ["first", "a", "c"]);
    let listed: Vec<String> = r.queue.list().into_iter().map(|s| s.id).collect();
    assert_eq!(listed, ["c", "b", "a", "first"], "newest first");
    assert!(matches!(r.queue.status("nope"), Err(QueueError::NotFound { .. })));
}

#[test]
fn cancelling_a_running_task_stops_it_at_its_next_step() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig::<false>(tmp.path());
    r.queue.submit(fake("long", 100_000), None).unwrap();
    wait_for(&r.queue, "long", |s| s.done > 0);
    assert_eq!(r.queue.cancel("long").unwrap().state, St::Stopping);
    let s = wait_for(&r.queue, "long", |s| s.state == St::Cancelled);
    assert!(s.done < 100_000);
    // The worker goes on with the next task.
    r.queue.submit(fake("next", 1), None).unwrap();
    wait_for(&r.queue, "next", |s| s.state == St::Done);
}

#[test]
fn a_panicking_task_fails_and_the_worker_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig::<false>(tmp.path());
    r.queue.submit(Fake { panic: true, ..fake("boom", 1) }, None).unwrap();
    r.queue.submit(fake("after", 1), None).unwrap();
    let s = wait_for(&r.queue, "boom", |s| matches!(s.state, St::Failed { .. }));
    assert_eq!(s.state, St::Failed { message: "the fake crashed; see the server log".into() });
    wait_for(&r.queue, "after", |s| s.state == St::Done);
    // The failure is on disk too.
    let on_disk: Fake = serde_json::from_slice(&std::fs::read(tmp.path().join("boom.json")).unwrap()).unwrap();
    assert_eq!(on_disk.state, s.state);
}

#[test]
fn records_survive_a_restart_and_shutdown_interrupts_what_had_not_ended() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let r = rig::<true>(tmp.path());
        r.queue.submit(fake("done", 1), None).unwrap();
        wait_for(&r.queue, "done", |s| s.state == St::Done);
        r.hold.store(true, Ordering::SeqCst);
        r.queue.submit(fake("running", 5), None).unwrap();
        wait_for(&r.queue, "running", |s| s.state == St::Running);
        r.queue.submit(fake("waiting", 5), None).unwrap();
        // Shutdown mid-task: the running one is asked to stop and ends as the task ends a
        // cancel; the waiting one is interrupted; join waits for the worker.
        r.workers.join();
        assert_eq!(state(&r, "running"), St::Stopped);
        assert_eq!(state(&r, "waiting"), St::Stopped);
        assert!(matches!(r.queue.submit(fake("late", 1), None), Err(QueueError::ShuttingDown)));
    }
    // A record a killed process left running.
    let crashed = Fake { state: St::Running, ..fake("killed", 3) };
    std::fs::write(tmp.path().join("killed.json"), serde_json::to_vec(&crashed).unwrap()).unwrap();
    std::fs::write(tmp.path().join("garbage.json"), b"{not json").unwrap();

    let r = rig::<true>(tmp.path());
    assert_eq!(state(&r, "done"), St::Done);
    assert_eq!(state(&r, "running"), St::Stopped);
    assert_eq!(state(&r, "killed"), St::Stopped, "interrupted: the long fake resumes");
    assert_eq!(r.queue.list().len(), 4, "the unreadable record is skipped");
    // Resume continues where it stopped.
    let resumed = r.queue.resume("killed", |_| {}).unwrap();
    assert_eq!(resumed.state, St::Queued { position: 1 });
    wait_for(&r.queue, "killed", |s| s.state == St::Done);
    assert!(matches!(r.queue.resume("done", |_| {}), Err(QueueError::WrongState { .. })));
    // Removing forgets the record.
    r.queue.remove("done").unwrap();
    assert!(!tmp.path().join("done.json").exists());
    assert!(matches!(r.queue.status("done"), Err(QueueError::NotFound { .. })));
}

#[test]
fn interrupted_interactive_tasks_fail_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let crashed = Fake { state: St::Queued { position: 1 }, ..fake("queued", 3) };
    std::fs::write(tmp.path().join("queued.json"), serde_json::to_vec(&crashed).unwrap()).unwrap();
    let r = rig::<false>(tmp.path());
    assert_eq!(state(&r, "queued"), St::Failed { message: "interrupted".into() });
    assert!(matches!(r.queue.resume("queued", |_| {}), Err(QueueError::WrongState { .. })));
}

#[test]
fn old_ended_tasks_are_forgotten_with_their_records() {
    let tmp = tempfile::tempdir().unwrap();
    let r = rig::<false>(tmp.path());
    for i in 0..6 {
        let id = format!("t{i}");
        r.queue.submit(fake(&id, 1), None).unwrap();
        wait_for(&r.queue, &id, |s| s.state == St::Done);
    }
    // The last task is counted as ended just after its final status is published.
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.queue.status("t1").is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(matches!(r.queue.status("t1"), Err(QueueError::NotFound { .. })));
    assert!(matches!(r.queue.status("t0"), Err(QueueError::NotFound { .. })));
    assert!(!tmp.path().join("t1.json").exists());
    assert!(tmp.path().join("t2.json").exists());
    assert_eq!(r.queue.list().len(), 4);
}

#[test]
fn long_tasks_pause_while_interactive_work_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let workers = Workers::start();
    let log = Arc::new(Mutex::new(Vec::new()));
    let hold = Arc::new(AtomicBool::new(false));
    let long = Queue::open(FakeTask::<true> { log: log.clone(), hold: hold.clone() }, JsonDir::open(tmp.path().join("l"), Layout::Flat).unwrap(), &workers).unwrap();
    let quick = Queue::open(FakeTask::<false> { log: log.clone(), hold: hold.clone() }, JsonDir::open(tmp.path().join("q"), Layout::Flat).unwrap(), &workers).unwrap();
    long.submit(fake("L", 400), None).unwrap();
    wait_for(&long, "L", |s| s.done > 5);
    quick.submit(fake("I", 50), None).unwrap();
    wait_for(&quick, "I", |s| s.state == St::Done);
    wait_for(&long, "L", |s| s.state == St::Done);
    let log = log.lock().unwrap();
    let first = log.iter().position(|x| x == "I").unwrap();
    let last = log.iter().rposition(|x| x == "I").unwrap();
    let long_steps_between = log[first..last].iter().filter(|x| *x == "L").count();
    assert!(long_steps_between <= 1, "the long task ran {long_steps_between} steps while the interactive one ran");
    assert_eq!(log.iter().filter(|x| *x == "L").count(), 400);
}
