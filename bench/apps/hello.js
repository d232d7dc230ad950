// The app both process managers run in the benchmark: the smallest useful node HTTP server.
// It listens on 127.0.0.1:$PORT and answers every request with "hello\n". The x-pid header
// lets the benchmark tell a restarted process from the one it killed.
'use strict';

const http = require('http');

const port = Number(process.env.PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('hello.js: set PORT to a TCP port number');
  process.exit(2);
}

const server = http.createServer((req, res) => {
  res.writeHead(200, {
    'content-type': 'text/plain',
    'x-pid': String(process.pid),
  });
  res.end('hello\n');
});

server.listen(port, '127.0.0.1', () => {
  console.log(`hello.js pid ${process.pid} listening on 127.0.0.1:${port}`);
});

process.on('SIGTERM', () => server.close(() => process.exit(0)));
process.on('SIGINT', () => server.close(() => process.exit(0)));
