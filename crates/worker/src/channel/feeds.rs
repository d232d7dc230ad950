//! Subscriptions: the published messages of one pattern, queued for one subscription.
//!
//! The master knows a pattern once per worker, however many subscriptions of the process share
//! it: the first subscription of a pattern sends `subscribe`, the last one dropped sends
//! `unsubscribe`, and each published message goes to every subscription of its pattern. Both are
//! decided and written under one lock, so the master sees them in the order they happened.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use corral_proto::channel::StateCall;

use super::Channel;
use super::calls::{Batch, CallError};
use crate::state::Published;

/// Messages kept for one subscription before the oldest are dropped (it is not reading them).
pub(crate) const MAX_QUEUED: usize = 4096;

/// The messages of one subscription, not yet taken.
#[derive(Debug, Default)]
pub(crate) struct Feed {
    state: Mutex<FeedState>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct FeedState {
    queued: VecDeque<Published>,
    /// The channel closed: nothing more will come.
    closed: bool,
    waker: Option<Waker>,
}

impl Feed {
    fn state(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, message: Published) {
        let mut state = self.state();
        if state.queued.len() == MAX_QUEUED {
            state.queued.pop_front();
        }
        state.queued.push_back(message);
        let waker = state.waker.take();
        drop(state);
        self.arrived.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        let waker = state.waker.take();
        drop(state);
        self.arrived.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The next message, waiting until `deadline` at most (for ever with `None`); `None` when
    /// the time ran out, or the channel closed and every message was taken.
    pub(crate) fn next_blocking(&self, deadline: Option<Instant>) -> Option<Published> {
        let mut state = self.state();
        loop {
            if let Some(message) = state.queued.pop_front() {
                return Some(message);
            }
            if state.closed {
                return None;
            }
            state = match deadline {
                None => self
                    .arrived
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.arrived
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// As [`Feed::next_blocking`], for the one async consumer.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Published>> {
        let mut state = self.state();
        if let Some(message) = state.queued.pop_front() {
            return Poll::Ready(Some(message));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Channel {
    fn subscribing(&self) -> MutexGuard<'_, ()> {
        self.subscribing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn feeds(&self) -> MutexGuard<'_, std::collections::HashMap<String, Vec<Arc<Feed>>>> {
        self.feeds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new subscription's feed for `pattern`, and, when it is the pattern's first, the
    /// `subscribe` call to wait for (the caller drops the feed with [`Channel::close_feed`] if
    /// that fails).
    pub(crate) fn open_feed(
        &self,
        pattern: &str,
    ) -> Result<(Arc<Feed>, Option<Arc<Batch>>), CallError> {
        let _order = self.subscribing();
        let feed = Arc::new(Feed::default());
        let first = {
            let mut feeds = self.feeds();
            // Checked under the feeds' lock: `close_feeds` closes the feeds it finds there after
            // the channel is marked closed, so a feed added here is either refused or closed.
            if self.is_closed() {
                return Err(CallError::ChannelClosed);
            }
            let sharing = feeds.entry(pattern.to_string()).or_default();
            sharing.push(feed.clone());
            sharing.len() == 1
        };
        let call = first.then(|| {
            self.call_state(vec![StateCall::Subscribe {
                pattern: pattern.to_string(),
            }])
        });
        Ok((feed, call))
    }

    /// Drops a subscription's feed; the pattern's last sends `unsubscribe` (its answer is not
    /// waited for).
    pub(crate) fn close_feed(&self, pattern: &str, feed: &Arc<Feed>) {
        let _order = self.subscribing();
        let last = {
            let mut feeds = self.feeds();
            let Some(sharing) = feeds.get_mut(pattern) else {
                return;
            };
            sharing.retain(|other| !Arc::ptr_eq(other, feed));
            if sharing.is_empty() {
                feeds.remove(pattern);
                true
            } else {
                false
            }
        };
        if last && !self.is_closed() {
            self.call_unanswered(StateCall::Unsubscribe {
                pattern: pattern.to_string(),
            });
        }
    }

    /// Queues a published message for every subscription of its pattern.
    pub(super) fn deliver(&self, message: Published) {
        let feeds = self.feeds();
        let Some(sharing) = feeds.get(&message.pattern) else {
            // Unsubscribed meanwhile.
            return;
        };
        if let Some((last, others)) = sharing.split_last() {
            for feed in others {
                feed.push(message.clone());
            }
            last.push(message);
        }
    }

    /// The channel closed: every subscription ends once its queued messages are taken.
    pub(super) fn close_feeds(&self) {
        for sharing in self.feeds().values() {
            for feed in sharing {
                feed.close();
            }
        }
    }

    /// The patterns subscribed, with how many subscriptions share each.
    #[cfg(test)]
    pub(crate) fn feed_counts(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<_> = self
            .feeds()
            .iter()
            .map(|(pattern, sharing)| (pattern.clone(), sharing.len()))
            .collect();
        counts.sort();
        counts
    }
}
