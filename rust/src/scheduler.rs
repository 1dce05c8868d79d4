//! The release queue: messages held per (pool, provider), released in order as limits allow.
//!
//! `due(now_ms, max)` returns the messages that may go now and the IP each goes on;
//! `next_due_ms(now_ms)` says when to ask again, so the caller sleeps instead of polling.
//! Within a queue, higher priority first, then first in first out; across queues, the same
//! order by each queue's head. A queue whose head cannot go is set aside until the time its
//! denial named (or, for an open-ended denial, until limits change), so one blocked
//! provider costs nothing while others flow.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use hashbrown::HashMap;

use crate::decision::Decision;
use crate::error::{CoreError, CoreResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    pub seq: u64,
    pub n: u32,
}

/// A queued message as plain data: (id, pool, provider, priority, n).
pub type Entry = (u64, u32, u16, i32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Ready,
    Blocked,
    Parked,
}

#[derive(Debug, Clone)]
struct Queue {
    pool: u32,
    provider: u16,
    /// Keyed by `-priority`, so the first level is the most urgent.
    levels: BTreeMap<i64, VecDeque<Queued>>,
    len: usize,
    state: State,
    /// Bumped whenever the queue's heap entry changes; older heap entries are stale.
    generation: u64,
    /// When a set-aside (`Blocked`) queue is looked at again.
    wake_ms: u64,
}

impl Queue {
    fn head(&self) -> Option<(i64, Queued)> {
        self.levels
            .first_key_value()
            .and_then(|(&l, q)| q.front().map(|&m| (l, m)))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    queues: Vec<Queue>,
    index: HashMap<(u32, u16), u32>,
    /// Queues whose head may go: (level, seq of head, queue, generation).
    ready: BinaryHeap<Reverse<(i64, u64, u32, u64)>>,
    /// Queues set aside until a time: (wake_ms, queue, generation).
    blocked: BinaryHeap<Reverse<(u64, u32, u64)>>,
    parked: Vec<u32>,
    next_seq: u64,
    len: usize,
}

impl Scheduler {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Messages queued for (pool, provider).
    pub fn waiting(&self, pool: u32, provider: u16) -> usize {
        self.index
            .get(&(pool, provider))
            .map_or(0, |&q| self.queues[q as usize].len)
    }

    /// Queue `id` for (pool, provider). Handles are checked by the engine.
    pub fn enqueue(
        &mut self,
        id: u64,
        pool: u32,
        provider: u16,
        priority: i32,
        n: u32,
    ) -> CoreResult<()> {
        if n == 0 {
            return Err(CoreError::bad("n", "must be at least 1, got 0"));
        }
        let q = match self.index.get(&(pool, provider)) {
            Some(&q) => q,
            None => {
                let q = self.queues.len() as u32;
                self.queues.push(Queue {
                    pool,
                    provider,
                    levels: BTreeMap::new(),
                    len: 0,
                    state: State::Idle,
                    generation: 0,
                    wake_ms: 0,
                });
                self.index.insert((pool, provider), q);
                q
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let level = -i64::from(priority);
        let queue = &mut self.queues[q as usize];
        let old_head = queue.head().map(|(l, m)| (l, m.seq));
        queue
            .levels
            .entry(level)
            .or_default()
            .push_back(Queued { id, seq, n });
        queue.len += 1;
        self.len += 1;
        let new_head = (level, seq);
        let head_changed = old_head.is_none_or(|h| new_head < h);
        // A new head may go where the old one could not, so it wakes a set-aside queue too.
        if queue.state == State::Idle || head_changed {
            self.make_ready(q);
        }
        Ok(())
    }

    fn make_ready(&mut self, q: u32) {
        let queue = &mut self.queues[q as usize];
        queue.generation += 1;
        match queue.head() {
            Some((level, m)) => {
                queue.state = State::Ready;
                self.ready
                    .push(Reverse((level, m.seq, q, queue.generation)));
            }
            None => queue.state = State::Idle,
        }
    }

    /// Limits changed: every set-aside queue gets another look.
    pub fn wake_all(&mut self) {
        self.blocked.clear();
        let parked = std::mem::take(&mut self.parked);
        for q in 0..self.queues.len() as u32 {
            if self.queues[q as usize].state == State::Blocked {
                self.make_ready(q);
            }
        }
        for q in parked {
            if self.queues[q as usize].state == State::Parked {
                self.make_ready(q);
            }
        }
    }

    fn wake_due(&mut self, now_ms: u64) {
        while let Some(&Reverse((wake, q, generation))) = self.blocked.peek() {
            if wake > now_ms {
                break;
            }
            self.blocked.pop();
            let queue = &self.queues[q as usize];
            if queue.state == State::Blocked && queue.generation == generation {
                self.make_ready(q);
            }
        }
    }

    /// Release up to `max` messages that may go at `now_ms`. `pick(pool, provider, n)` decides
    /// and charges each one; a denial sets its queue aside.
    pub fn due(
        &mut self,
        now_ms: u64,
        max: usize,
        mut pick: impl FnMut(u32, u16, u32) -> Decision,
        out: &mut Vec<(u64, Decision)>,
    ) {
        self.wake_due(now_ms);
        let mut released = 0;
        while released < max {
            let Some(Reverse((_, _, q, generation))) = self.ready.pop() else {
                break;
            };
            let queue = &mut self.queues[q as usize];
            if queue.state != State::Ready || queue.generation != generation {
                continue;
            }
            let (level, head) = queue.head().expect("ready queues are not empty");
            let d = pick(queue.pool, queue.provider, head.n);
            if d.is_granted() {
                let lane = queue.levels.get_mut(&level).expect("head level");
                lane.pop_front();
                if lane.is_empty() {
                    queue.levels.remove(&level);
                }
                queue.len -= 1;
                self.len -= 1;
                out.push((head.id, d));
                released += 1;
                self.make_ready(q);
            } else {
                queue.generation += 1;
                match d.retry_after_ms {
                    Some(wait) => {
                        queue.state = State::Blocked;
                        let wake = now_ms.saturating_add(wait.max(1));
                        queue.wake_ms = wake;
                        self.blocked.push(Reverse((wake, q, queue.generation)));
                    }
                    None => {
                        queue.state = State::Parked;
                        self.parked.push(q);
                    }
                }
            }
        }
    }

    /// When `due` may next release something: `now_ms` if a queue is ready, the earliest
    /// wake-up of a set-aside queue, or `None` (nothing queued, or only open-ended waits).
    pub fn next_due_ms(&mut self, now_ms: u64) -> Option<u64> {
        while let Some(&Reverse((_, _, q, generation))) = self.ready.peek() {
            let queue = &self.queues[q as usize];
            if queue.state == State::Ready && queue.generation == generation {
                return Some(now_ms);
            }
            self.ready.pop();
        }
        while let Some(&Reverse((wake, q, generation))) = self.blocked.peek() {
            let queue = &self.queues[q as usize];
            if queue.state == State::Blocked && queue.generation == generation {
                return Some(wake.max(now_ms));
            }
            self.blocked.pop();
        }
        None
    }

    /// Every queue holding messages as (pool, provider, messages, next release): the time
    /// its head may go (`now_ms` when it may go now), or None while it waits for limits to
    /// change (a pause, a cap reached with no end in sight).
    pub fn summary(&self, now_ms: u64) -> Vec<(u32, u16, usize, Option<u64>)> {
        self.queues
            .iter()
            .filter(|q| q.len > 0)
            .map(|q| {
                let next = match q.state {
                    State::Ready | State::Idle => Some(now_ms),
                    State::Blocked => Some(q.wake_ms.max(now_ms)),
                    State::Parked => None,
                };
                (q.pool, q.provider, q.len, next)
            })
            .collect()
    }

    /// The (pool, provider) of every queue holding messages. (Empty queues are left out, as
    /// a snapshot leaves them out, so a restored engine interns keys at the same moments.)
    pub fn pairs(&self) -> Vec<(u32, u16)> {
        self.queues
            .iter()
            .filter(|q| q.len > 0)
            .map(|q| (q.pool, q.provider))
            .collect()
    }

    /// Every queued message as (id, pool, provider, priority, n), oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        let mut all: Vec<(u64, Entry)> = Vec::with_capacity(self.len);
        for q in &self.queues {
            for (&level, lane) in &q.levels {
                let priority = i32::try_from(-level).expect("levels come from i32");
                for m in lane {
                    all.push((m.seq, (m.id, q.pool, q.provider, priority, m.n)));
                }
            }
        }
        all.sort_unstable_by_key(|e| e.0);
        all.into_iter().map(|e| e.1).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Reason, Tier};

    fn grant(key: u32) -> Decision {
        Decision {
            granted: 1,
            reason: Reason::Granted,
            retry_after_ms: Some(0),
            key,
            tier: Tier::Warm,
        }
    }

    fn deny(wait: Option<u64>) -> Decision {
        Decision {
            granted: 0,
            reason: Reason::Rate,
            retry_after_ms: wait,
            key: 0,
            tier: Tier::Direct,
        }
    }

    #[test]
    fn priority_then_fifo() {
        let mut s = Scheduler::default();
        s.enqueue(1, 0, 0, 0, 1).unwrap();
        s.enqueue(2, 0, 0, 5, 1).unwrap();
        s.enqueue(3, 0, 1, 0, 1).unwrap();
        s.enqueue(4, 0, 0, 5, 1).unwrap();
        let mut out = Vec::new();
        s.due(0, 10, |_, _, _| grant(0), &mut out);
        let ids: Vec<u64> = out.iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![2, 4, 1, 3]);
        assert!(s.is_empty());
        assert_eq!(s.next_due_ms(0), None);
    }

    #[test]
    fn blocked_queue_waits_and_others_flow() {
        let mut s = Scheduler::default();
        s.enqueue(1, 0, 0, 0, 1).unwrap();
        s.enqueue(2, 0, 1, 0, 1).unwrap();
        let mut out = Vec::new();
        s.due(
            0,
            10,
            |_, prov, _| if prov == 0 { deny(Some(500)) } else { grant(1) },
            &mut out,
        );
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.next_due_ms(100), Some(500));
        assert_eq!(s.summary(100), vec![(0, 0, 1, Some(500))]);
        assert_eq!(s.waiting(0, 0), 1);
        assert_eq!(s.waiting(0, 1), 0);
        out.clear();
        // Not yet: the queue is set aside, pick is not even asked.
        s.due(499, 10, |_, _, _| panic!("asked too early"), &mut out);
        assert!(out.is_empty());
        s.due(500, 10, |_, _, _| grant(0), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn parked_queue_wakes_on_limit_change() {
        let mut s = Scheduler::default();
        s.enqueue(1, 0, 0, 0, 1).unwrap();
        let mut out = Vec::new();
        s.due(0, 10, |_, _, _| deny(None), &mut out);
        assert_eq!(s.next_due_ms(0), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.summary(3), vec![(0, 0, 1, None)]);
        s.wake_all();
        assert_eq!(s.next_due_ms(7), Some(7));
        s.due(7, 10, |_, _, _| grant(0), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_new_head_wakes_a_set_aside_queue() {
        let mut s = Scheduler::default();
        s.enqueue(1, 0, 0, 0, 2).unwrap();
        let mut out = Vec::new();
        s.due(0, 10, |_, _, _| deny(None), &mut out);
        assert_eq!(s.next_due_ms(0), None);
        s.enqueue(2, 0, 0, 1, 1).unwrap();
        assert_eq!(s.next_due_ms(0), Some(0));
        s.due(
            0,
            10,
            |_, _, n| if n == 1 { grant(0) } else { deny(None) },
            &mut out,
        );
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn max_bounds_a_call_and_entries_keep_order() {
        let mut s = Scheduler::default();
        for id in 0..10 {
            s.enqueue(id, 0, (id % 2) as u16, 0, 1).unwrap();
        }
        let mut out = Vec::new();
        s.due(0, 3, |_, _, _| grant(0), &mut out);
        assert_eq!(out.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        let rest: Vec<u64> = s.entries().iter().map(|e| e.0).collect();
        assert_eq!(rest, (3..10).collect::<Vec<_>>());
        assert!(s.enqueue(99, 0, 0, 0, 0).is_err());
    }
}
