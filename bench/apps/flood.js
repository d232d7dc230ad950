// Writes LINES numbered lines of exactly 100 bytes to stdout as fast as it can, then exits.
// Line n (counting from 0) is: n as 10 zero-padded digits, a space, 88 filler characters, "\n".
// The benchmark reads the numbers back to count lines lost, duplicated or garbled.
'use strict';

const total = Number(process.argv[2] || process.env.LINES || 2000000);
if (!Number.isInteger(total) || total < 0) {
  console.error('flood.js: the line count must be a non-negative integer');
  process.exit(2);
}

const LINE_BYTES = 100;
const FILLER = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'.repeat(2).slice(0, 88);
const PER_CHUNK = 1000; // 100 KB per write

let next = 0;

function chunk() {
  const end = Math.min(next + PER_CHUNK, total);
  const buf = Buffer.allocUnsafe((end - next) * LINE_BYTES);
  let at = 0;
  for (let n = next; n < end; n++) {
    at += buf.write(String(n).padStart(10, '0'), at, 'latin1');
    buf[at++] = 0x20;
    at += buf.write(FILLER, at, 'latin1');
    buf[at++] = 0x0a;
  }
  next = end;
  return buf;
}

function pump() {
  while (next < total) {
    // Respect back-pressure: when the stream's buffer is full, wait for it to drain.
    if (!process.stdout.write(chunk())) {
      process.stdout.once('drain', pump);
      return;
    }
  }
}

process.stdout.on('error', (err) => {
  console.error(`flood.js: stdout: ${err.message}`);
  process.exit(1);
});
pump();
