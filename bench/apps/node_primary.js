// Node's own cluster primary, the baseline of bench/node_cluster.py. It forks WORKERS (default 2)
// workers running the app given as its argument (default hello.js), with Node's default
// scheduling (round robin on Linux). On SIGUSR2 it replaces them one at a time: a new worker
// listens before the old one gets disconnect(), and the next starts once the old one has exited.
// It prints `ready <pids>` once the first workers listen and `reloaded <n> <pids>` after each
// rolling reload: the benchmark waits for these lines. A worker that dies unasked is replaced.
'use strict';

const cluster = require('cluster');
const path = require('path');

const count = Number(process.env.WORKERS || 2);
cluster.setupPrimary({ exec: path.resolve(process.argv[2] || path.join(__dirname, 'hello.js')) });

const listening = (worker) => new Promise((resolve) => worker.once('listening', resolve));
const exited = (worker) => new Promise((resolve) => worker.once('exit', resolve));
const pids = () => Object.values(cluster.workers).map((w) => w.process.pid).join(' ');

Promise.all(Array.from({ length: count }, () => listening(cluster.fork())))
  .then(() => console.log(`ready ${pids()}`));

let reloads = 0;
let queue = Promise.resolve();
process.on('SIGUSR2', () => {
  queue = queue.then(async () => {
    for (const old of Object.values(cluster.workers)) {
      await listening(cluster.fork());
      old.disconnect();
      await exited(old);
    }
    console.log(`reloaded ${++reloads} ${pids()}`);
  });
});

cluster.on('exit', (worker, code, signal) => {
  if (!worker.exitedAfterDisconnect) {
    console.log(`died ${worker.process.pid} ${signal || code}`);
    cluster.fork();
  }
});
