//! The order of a rolling reload: one instance at a time, each replaced (its new process ready,
//! see [`crate::lifecycle`]) and its old process gone before the next begins; the first failure
//! ends the reload, the instances not reached yet keeping their old processes.

use std::collections::VecDeque;

/// A reload of one app.
#[derive(Debug, Clone, Default)]
pub struct Rolling {
    queue: VecDeque<u32>,
    step: Option<StepState>,
    failed: Option<(u32, String)>,
    done: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct StepState {
    id: u32,
    replaced: bool,
}

/// What the reload wants now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Replace this instance (feed it a `Replace` input).
    Replace(u32),
    /// Wait for the instance under way.
    Wait,
    /// Every instance was replaced.
    Done,
    /// An instance's replacement failed; the reload is over.
    Failed {
        /// The instance.
        id: u32,
        /// Why.
        why: String,
    },
}

impl Rolling {
    /// A reload of these instances, in this order (the agent first, then by index).
    pub fn new(ids: impl IntoIterator<Item = u32>) -> Rolling {
        Rolling {
            queue: ids.into_iter().collect(),
            ..Rolling::default()
        }
    }

    /// The next step, given whether an instance's retired processes are all gone.
    pub fn next(&mut self, old_gone: impl Fn(u32) -> bool) -> Step {
        if let Some((id, why)) = &self.failed {
            return Step::Failed {
                id: *id,
                why: why.clone(),
            };
        }
        if let Some(step) = self.step {
            if !step.replaced || !old_gone(step.id) {
                return Step::Wait;
            }
            self.done.push(step.id);
            self.step = None;
        }
        match self.queue.pop_front() {
            Some(id) => {
                self.step = Some(StepState {
                    id,
                    replaced: false,
                });
                Step::Replace(id)
            }
            None => Step::Done,
        }
    }

    /// The instance under way reports its replacement's outcome.
    pub fn replaced(&mut self, id: u32, result: Result<(), String>) {
        let Some(step) = self.step.as_mut().filter(|s| s.id == id) else {
            return;
        };
        match result {
            Ok(()) => step.replaced = true,
            Err(why) => {
                self.failed = Some((id, why));
                self.queue.clear();
            }
        }
    }

    /// An instance was deleted meanwhile: it is skipped.
    pub fn forget(&mut self, id: u32) {
        self.queue.retain(|&q| q != id);
        if self.step.is_some_and(|s| s.id == id) {
            self.step = None;
        }
    }

    /// The instance being replaced now.
    pub fn under_way(&self) -> Option<u32> {
        self.step.map(|s| s.id)
    }

    /// The instances replaced so far.
    pub fn replaced_ids(&self) -> &[u32] {
        &self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_at_a_time_each_waiting_for_its_old_process() {
        let mut r = Rolling::new([4, 5]);
        assert_eq!(r.next(|_| true), Step::Replace(4));
        assert_eq!(r.next(|_| true), Step::Wait, "not replaced yet");
        r.replaced(4, Ok(()));
        assert_eq!(r.next(|_| false), Step::Wait, "old process not gone");
        assert_eq!(r.next(|_| true), Step::Replace(5));
        r.replaced(5, Ok(()));
        assert_eq!(r.next(|_| true), Step::Done);
        assert_eq!(r.replaced_ids(), [4, 5]);
    }

    #[test]
    fn the_first_failure_ends_it_and_the_rest_is_not_touched() {
        let mut r = Rolling::new([1, 2, 3]);
        assert_eq!(r.next(|_| true), Step::Replace(1));
        r.replaced(1, Ok(()));
        assert_eq!(r.next(|_| true), Step::Replace(2));
        r.replaced(3, Err("not under way".into()));
        r.replaced(2, Err("exited with code 1".into()));
        let failed = Step::Failed {
            id: 2,
            why: "exited with code 1".into(),
        };
        assert_eq!(r.next(|_| true), failed);
        assert_eq!(r.next(|_| true), failed, "stays failed");
        assert_eq!(r.replaced_ids(), [1]);
    }

    #[test]
    fn a_deleted_instance_is_skipped() {
        let mut r = Rolling::new([1, 2, 3]);
        assert_eq!(r.next(|_| true), Step::Replace(1));
        r.forget(1);
        r.forget(2);
        assert_eq!(r.next(|_| true), Step::Replace(3));
        assert_eq!(r.under_way(), Some(3));
    }
}
