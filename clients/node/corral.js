// corral.js: the bus and the shared state of corral, for Node.js programs that corral runs.
//
// Copy this file next to your app, or require it by path: `const corral = require('./corral')`.
// No dependencies; Node 18 or later; CommonJS. README.md next to it shows how to use it.
//
// How it works: a Node program run by corral has Node's own IPC channel to the master
// (`process.send`, `process.on('message')`, JSON serialization). Every call here is one
// `process.send({corral: {type: 'state' | 'send', id, ...}})`, answered by exactly one
// `{corral: {type: 'state' | 'reply', id, ...}}` with the same id; the master also sends
// `{corral: {type: 'published', ...}}` for subscriptions and `{corral: {type: 'message', ...}}`
// for messages from other instances. docs/protocol.md, "The bus and the shared state", is the
// contract.
//
// The process's lifetime: Node keeps a process alive while it has a 'message' (or 'disconnect')
// listener. This module's own listeners and its subscriptions do not: a worker that closes its
// server on SIGTERM still exits once its work is done. A call waiting for its answer does, as
// any I/O in flight does (at most until its timeout), and so do onMessage and onRequest
// handlers, as the app's own `process.on('message')` would, until the function they returned
// removes them.
'use strict';

/** The longest wait for any answer, unless `configure({timeoutMs})` says otherwise. */
const DEFAULT_TIMEOUT_MS = 10_000;
/** The master's own wait for a request's answer when the request does not name one. */
const DEFAULT_REQUEST_TIMEOUT_MS = 5_000;
/** The master's longest wait for a request's answer, whatever the request asks. */
const MAX_REQUEST_TIMEOUT_MS = 600_000;
/** How much longer than a request's own timeout the client waits for the master's verdict. */
const REQUEST_GRACE_MS = 1_000;
/** The largest state value or published message, in bytes (the master's limit). */
const MAX_VALUE_BYTES = 512 * 1024;
/** The largest line on the channel, in bytes: the master ends a worker that sends a longer one. */
const MAX_LINE_BYTES = 1024 * 1024;

const env = process.env;

/** This instance's role: 'worker', or 'agent' for an app's agent; null outside corral. */
const role = env.CORRAL_ROLE || null;
/** This instance's id (the `id` column of `corral ls`); null outside corral. */
const id = env.CORRAL_ID ? Number(env.CORRAL_ID) : null;
/** This instance's app name; null outside corral. */
const app = env.CORRAL_APP || null;

let timeoutMs = DEFAULT_TIMEOUT_MS;
let nextId = 1;
/**
 * Unanswered calls by id: {type: 'state' | 'send', resolve, reject, timer}. While there is one,
 * the channel holds the process, so that `await corral.state.incr(...)` gets its answer.
 */
class PendingCalls extends Map {
  set(key, value) {
    const empty = this.size === 0;
    super.set(key, value);
    if (empty) countChannelRef(+1);
    return this;
  }

  delete(key) {
    const had = super.delete(key);
    if (had && this.size === 0) countChannelRef(-1);
    return had;
  }
}
const pending = new PendingCalls();
/** Subscriptions by pattern: {handlers: Set of {handler}, ready: Promise}. */
const subscriptions = new Map();
/** onMessage handlers (wrapped so that one function may be registered twice). */
const messageHandlers = new Set();
let requestHandler = null;
/** Set once the channel has closed: every call then rejects with it. */
let closedError = null;

// ---------------------------------------------------------------------------------------------
// The channel

function unavailable() {
  if (typeof process.send !== 'function') {
    return new Error(
      'corral.js: this process has no channel to a corral master (process.send is missing); ' +
        'the app must be started by corral (corral start app.js) to use the bus and the ' +
        'shared state',
    );
  }
  if (closedError) return closedError;
  if (process.connected === false) return channelClosed();
  return null;
}

function channelClosed() {
  return new Error(
    'corral.js: the channel to the corral master is closed (corral is stopping this process, or ' +
      'the master went away), so the call cannot be answered',
  );
}

let listening = false;

// Installs this module's 'message' and 'disconnect' listeners, the first time they are needed.
// Node refs the channel for every such listener (process.channel.refCounted()); ours undo that
// with the matching unrefCounted(), so the count, and whether the channel keeps the process
// alive, stay as the app's own listeners make them. Where Node lacks these methods (not Node
// 18 to 22), the listeners keep the process alive as any 'message' listener does.
function listen() {
  if (listening) return;
  listening = true;
  for (const [event, listener] of ownListeners) {
    if (process.listeners(event).includes(listener)) continue;
    process.on(event, listener);
    countChannelRef(-1);
  }
  if (!process.listeners('removeListener').includes(onRemoveListener)) {
    process.on('removeListener', onRemoveListener);
  }
}

function countChannelRef(delta) {
  const control = process.channel;
  if (!control) return;
  if (delta < 0 && typeof control.unrefCounted === 'function') control.unrefCounted();
  if (delta > 0 && typeof control.refCounted === 'function') control.refCounted();
}

// Someone removed one of our listeners (process.removeAllListeners('message'), say): Node
// counted it down, which was not ours to count, so count it back, and listen again on the next
// call.
function onRemoveListener(event, listener) {
  if (ownListeners.get(event) === listener) {
    countChannelRef(+1);
    listening = false;
  }
}

function onDisconnect() {
  closedError = channelClosed();
  for (const [callId, call] of pending) {
    pending.delete(callId);
    clearTimeout(call.timer);
    call.reject(closedError);
  }
  subscriptions.clear();
}

// Every message the process gets passes here; only those with a `corral` key are ours, and
// every message, ours or not, also reaches the app's own listeners.
function onChannelMessage(message) {
  if (message === null || typeof message !== 'object') return;
  if (!Object.prototype.hasOwnProperty.call(message, 'corral')) return;
  const body = message.corral;
  if (body === null || typeof body !== 'object') return;
  switch (body.type) {
    case 'state':
      settle(body.id, 'state', body, 'ok');
      break;
    case 'reply':
      settle(body.id, 'send', body, 'data');
      break;
    case 'published':
      published(body);
      break;
    case 'message':
      delivered(body);
      break;
    default:
    // A later protocol version may add types: skip them.
  }
}

const ownListeners = new Map([
  ['message', onChannelMessage],
  ['disconnect', onDisconnect],
]);

function settle(callId, type, body, field) {
  const call = pending.get(callId);
  // An answer that came after its call timed out, or is not for a call of this kind, is dropped.
  if (!call || call.type !== type) return;
  pending.delete(callId);
  clearTimeout(call.timer);
  if (body.error !== undefined && body.error !== null) {
    call.reject(new Error(String(body.error)));
  } else {
    call.resolve(body[field] === undefined ? null : body[field]);
  }
}

// JSON text of a message, or an Error saying why it cannot go on the channel.
function encode(message) {
  let text;
  try {
    text = JSON.stringify(message);
  } catch (error) {
    return new TypeError(`corral.js: the data cannot be sent as JSON: ${error.message}`);
  }
  const bytes = Buffer.byteLength(text) + 1;
  if (bytes > MAX_LINE_BYTES) {
    return new RangeError(
      `corral.js: the message is ${bytes} bytes as JSON, over the channel's limit of ` +
        `${MAX_LINE_BYTES} bytes; send a reference to large data instead of the data`,
    );
  }
  return null;
}

// One call: sends `message` (a WorkerMessage without its id) and resolves with the answer.
function call(message, what, waitMs = timeoutMs) {
  return new Promise((resolve, reject) => {
    const failure = unavailable();
    if (failure) {
      reject(failure);
      return;
    }
    listen();
    const callId = nextId++;
    const wire = { type: message.type, id: callId, ...message };
    const invalid = encode({ corral: wire });
    if (invalid) {
      reject(invalid);
      return;
    }
    const timer = setTimeout(() => {
      pending.delete(callId);
      reject(
        new Error(
          `corral.js: no answer from the corral master to ${what} within ${waitMs} ms; ` +
            'the master may be overloaded, or this process is not run by corral',
        ),
      );
    }, waitMs);
    timer.unref();
    pending.set(callId, { type: message.type, resolve, reject, timer });
    const failed = (error) => {
      const call = pending.get(callId);
      if (!error || !call) return;
      pending.delete(callId);
      clearTimeout(timer);
      reject(error.code === 'ERR_IPC_CHANNEL_CLOSED' ? closedError || channelClosed() : error);
    };
    try {
      process.send({ corral: wire }, failed);
    } catch (error) {
      failed(error);
    }
  });
}

// A message that needs no answer (a reply to a request): errors have nowhere to go.
function post(message) {
  if (unavailable()) return;
  try {
    process.send({ corral: message }, () => {});
  } catch {
    // The channel closed meanwhile: the asker gets an error from the master.
  }
}

// ---------------------------------------------------------------------------------------------
// Handlers

// Calls an app's handler so that its exception is an uncaught exception, as in any event
// listener, but only after every other handler and listener got the message.
function invoke(handler, ...args) {
  try {
    handler(...args);
  } catch (error) {
    process.nextTick(() => {
      throw error;
    });
  }
}

function published(body) {
  const entry = subscriptions.get(body.pattern);
  if (!entry) return;
  for (const { handler } of [...entry.handlers]) {
    invoke(handler, body.message, body.channel, body.pattern);
  }
}

function delivered(body) {
  const from = typeof body.from === 'string' ? body.from : null;
  if (body.request !== undefined && body.request !== null) {
    answer(body.request, body.data, from);
    return;
  }
  for (const { handler } of [...messageHandlers]) invoke(handler, body.data, from);
}

function answer(request, data, from) {
  const handler = requestHandler;
  if (!handler) {
    const who = id === null ? 'this instance' : `worker:${id}`;
    post({
      type: 'reply',
      request,
      error: `${who} does not answer requests: it has not called corral.onRequest(handler)`,
    });
    return;
  }
  new Promise((resolve) => resolve(handler(data, from))).then(
    (value) => {
      const reply = { type: 'reply', request, data: value === undefined ? null : value };
      const invalid = encode({ corral: reply });
      post(invalid ? { type: 'reply', request, error: invalid.message } : reply);
    },
    (error) => post({ type: 'reply', request, error: errorText(error) }),
  );
}

function errorText(error) {
  if (error instanceof Error) return error.message || error.name;
  return String(error);
}

// Node keeps a process alive while it has a 'message' listener; a registered onMessage or
// onRequest handler is the app's way of listening, so it holds the process the same way, by a
// listener of its own that Node counts.
let holding = false;
function hold() {}
function holdWhileHandled() {
  const wanted = requestHandler !== null || messageHandlers.size > 0;
  if (wanted && !holding && typeof process.send === 'function') {
    process.on('message', hold);
    holding = true;
  } else if (!wanted && holding) {
    process.removeListener('message', hold);
    holding = false;
  }
}

/**
 * Answers requests (`corral.request` in another instance, whose `from` is 'worker:<id>', or
 * `corral send --reply`, from 'cli'): `handler(data, from)`'s value, or the value its promise
 * resolves to, is the answer; a thrown error or a rejected promise answers
 * `{error: message}`. One handler at a time: a later call replaces it. Returns a function that
 * removes it. A request that comes while there is none is answered with an error at once.
 */
function onRequest(handler) {
  if (typeof handler !== 'function') {
    throw new TypeError('corral.onRequest: the handler must be a function (data, from) => answer');
  }
  requestHandler = handler;
  if (typeof process.send === 'function') listen();
  holdWhileHandled();
  return function offRequest() {
    if (requestHandler === handler) requestHandler = null;
    holdWhileHandled();
  };
}

/**
 * Calls `handler(data, from)` for every bus message from another instance (`corral.send`) that
 * does not wait for an answer; `from` is 'worker:<id>'. Returns a function that removes it. (A
 * plain `corral send` from the CLI is not wrapped and reaches process.on('message') only.)
 */
function onMessage(handler) {
  if (typeof handler !== 'function') {
    throw new TypeError('corral.onMessage: the handler must be a function (data, from) => {}');
  }
  const entry = { handler };
  messageHandlers.add(entry);
  if (typeof process.send === 'function') listen();
  holdWhileHandled();
  return function offMessage() {
    messageHandlers.delete(entry);
    holdWhileHandled();
  };
}

// ---------------------------------------------------------------------------------------------
// Arguments

function need(condition, where, text) {
  if (!condition) throw new TypeError(`corral.${where}: ${text}`);
}

function checkName(value, where, what) {
  need(typeof value === 'string', where, `the ${what} must be a string, not ${describe(value)}`);
}

function checkText(value, where, what) {
  need(typeof value === 'string', where, `the ${what} must be a string, not ${describe(value)}` +
    (where.startsWith('state.set') ? ' (setJSON stores any JSON value)' : ''));
  const bytes = Buffer.byteLength(value);
  if (bytes > MAX_VALUE_BYTES) {
    throw new RangeError(
      `corral.${where}: the ${what} is ${bytes} bytes, over the limit of ${MAX_VALUE_BYTES} ` +
        'bytes; store large data elsewhere and keep a reference in the store',
    );
  }
}

function ttlOf(options, where) {
  const ttlMs = options && options.ttlMs;
  if (ttlMs === undefined || ttlMs === null) return undefined;
  need(Number.isSafeInteger(ttlMs) && ttlMs > 0, where,
    `ttlMs must be a whole number of milliseconds above 0, not ${describe(ttlMs)}`);
  return ttlMs;
}

function describe(value) {
  if (value === null) return 'null';
  if (typeof value === 'string') {
    return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
  }
  if (typeof value === 'number' || typeof value === 'boolean') return `${typeof value} ${value}`;
  return typeof value;
}

function stateCall(op, what) {
  return call({ type: 'state', call: op }, what);
}

// ---------------------------------------------------------------------------------------------
// The shared state

const state = {
  /** The value of `key` (a string), or null when it is not set. */
  async get(key) {
    checkName(key, 'state.get', 'key');
    return stateCall({ op: 'get', key }, `state.get(${describe(key)})`);
  },

  /** Sets `key` to the string `value`, for `ttlMs` milliseconds when given. Resolves to true. */
  async set(key, value, options) {
    checkName(key, 'state.set', 'key');
    checkText(value, 'state.set', 'value');
    const ttl_ms = ttlOf(options, 'state.set');
    return stateCall({ op: 'set', key, value, ttl_ms }, `state.set(${describe(key)})`);
  },

  /** Removes `key`. Resolves to whether it was set. */
  async del(key) {
    checkName(key, 'state.del', 'key');
    return stateCall({ op: 'del', key }, `state.del(${describe(key)})`);
  },

  /**
   * Adds `by` (default 1, may be negative) to the integer in `key`, a missing key counting as 0.
   * Resolves to the new value (exact up to 2^53).
   */
  async incr(key, by = 1) {
    checkName(key, 'state.incr', 'key');
    need(Number.isSafeInteger(by), 'state.incr', `by must be a whole number, not ${describe(by)}`);
    return stateCall({ op: 'incr', key, by }, `state.incr(${describe(key)})`);
  },

  /**
   * Sets `key` to `next` (removes it when null) only if its value is now `expected` (null: only
   * if it is not set). Resolves to whether it swapped.
   */
  async cas(key, expected, next, options) {
    checkName(key, 'state.cas', 'key');
    if (expected === undefined) expected = null;
    if (next === undefined) next = null;
    if (expected !== null) checkText(expected, 'state.cas', 'expected value');
    if (next !== null) checkText(next, 'state.cas', 'new value');
    const ttl_ms = ttlOf(options, 'state.cas');
    const op = { op: 'cas', key, expected, new: next, ttl_ms };
    return stateCall(op, `state.cas(${describe(key)})`);
  },

  /** The keys matching a glob pattern (`*`, `?`, `[a-z]`, `\` escapes), sorted. */
  async keys(pattern = '*') {
    checkName(pattern, 'state.keys', 'pattern');
    return stateCall({ op: 'keys', pattern }, `state.keys(${describe(pattern)})`);
  },

  /**
   * Publishes the string `message` on `channel`. Resolves to how many subscribed patterns got
   * it (one per pattern, however many processes subscribed to it).
   */
  async publish(channel, message) {
    checkName(channel, 'state.publish', 'channel');
    checkText(message, 'state.publish', 'message');
    return stateCall({ op: 'publish', channel, message }, `state.publish(${describe(channel)})`);
  },

  /**
   * Calls `handler(message, channel, pattern)` for every message published on a channel that
   * matches `pattern` (a glob; a plain name matches itself). Resolves, once the master has the
   * subscription, to an async function that ends it. Subscriptions do not keep the process alive,
   * and end with the channel (a restarted process subscribes again).
   */
  async subscribe(pattern, handler) {
    checkName(pattern, 'state.subscribe', 'pattern');
    need(typeof handler === 'function', 'state.subscribe',
      'the handler must be a function (message, channel, pattern) => {}');
    let entry = subscriptions.get(pattern);
    if (!entry) {
      // One subscription at the master per pattern, shared by every local handler of it.
      const created = { handlers: new Set(), ready: null };
      const what = `state.subscribe(${describe(pattern)})`;
      created.ready = stateCall({ op: 'subscribe', pattern }, what).catch((error) => {
        if (subscriptions.get(pattern) === created) subscriptions.delete(pattern);
        throw error;
      });
      subscriptions.set(pattern, created);
      entry = created;
    }
    const token = { handler };
    entry.handlers.add(token);
    try {
      await entry.ready;
    } catch (error) {
      entry.handlers.delete(token);
      throw error;
    }
    let ended = null;
    return function unsubscribe() {
      if (ended) return ended;
      entry.handlers.delete(token);
      if (entry.handlers.size > 0 || subscriptions.get(pattern) !== entry) {
        ended = Promise.resolve();
      } else {
        subscriptions.delete(pattern);
        ended = stateCall({ op: 'unsubscribe', pattern }, `unsubscribe(${describe(pattern)})`)
          .then(() => undefined);
      }
      return ended;
    };
  },

  /** The value of `key` parsed as JSON, or null when it is not set. */
  async getJSON(key) {
    const text = await state.get(key);
    if (text === null) return null;
    try {
      return JSON.parse(text);
    } catch (error) {
      throw new SyntaxError(
        `corral.state.getJSON: the value of key ${describe(key)} is not JSON (${error.message}); ` +
          'read it with state.get',
      );
    }
  },

  /** Sets `key` to `value` as JSON text (see set). */
  async setJSON(key, value, options) {
    const text = JSON.stringify(value);
    need(text !== undefined, 'state.setJSON', `${describe(value)} has no JSON form`);
    return state.set(key, text, options);
  },
};

// ---------------------------------------------------------------------------------------------
// The bus

/**
 * Sends `data` (any JSON) to `to`: 'agent', 'workers', 'worker:<id>', 'app:<name>' or 'all'.
 * Resolves to how many processes got it; rejects when the target reaches none.
 */
async function send(to, data) {
  checkName(to, 'send', 'target');
  const reply = await call(
    { type: 'send', to, data: data === undefined ? null : data },
    `send(${describe(to)})`,
  );
  return reply !== null && typeof reply.delivered === 'number' ? reply.delivered : 0;
}

/**
 * Sends `data` to one instance and resolves to its answer; rejects with its error, or the
 * master's (no such recipient, no answer within `timeoutMs`: default 5000, at most 600000).
 */
async function request(to, data, options) {
  checkName(to, 'request', 'target');
  const wait = options && options.timeoutMs;
  const given = wait !== undefined && wait !== null;
  need(!given || (Number.isSafeInteger(wait) && wait > 0), 'request',
    `timeoutMs must be a whole number of milliseconds above 0, not ${describe(wait)}`);
  const message = { type: 'send', to, data: data === undefined ? null : data, request: true };
  if (given) message.timeout_ms = wait;
  // The master says when the recipient did not answer in time; wait a little longer for that.
  const masterWait = Math.min(given ? wait : DEFAULT_REQUEST_TIMEOUT_MS, MAX_REQUEST_TIMEOUT_MS);
  const guard = Math.max(timeoutMs, masterWait + REQUEST_GRACE_MS);
  return call(message, `request(${describe(to)})`, guard);
}

/** Sets the longest wait for any answer from the master, in milliseconds (default 10000). */
function configure(options = {}) {
  if (options.timeoutMs !== undefined) {
    const wait = options.timeoutMs;
    need(Number.isSafeInteger(wait) && wait > 0, 'configure',
      `timeoutMs must be a whole number of milliseconds above 0, not ${describe(wait)}`);
    timeoutMs = wait;
  }
}

module.exports = {
  role,
  id,
  app,
  state,
  send,
  request,
  onRequest,
  onMessage,
  configure,
};
