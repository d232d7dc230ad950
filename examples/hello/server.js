// A tiny HTTP app for the demo. Under `corral start --listen ADDR` every instance serves on the
// one listening socket the master shares with it (systemd socket activation: descriptor 3, with
// LISTEN_FDS and LISTEN_PID). Run alone, it listens on 127.0.0.1:$PORT (default 3000).
const http = require('http');

const instance = Number(process.env.CORRAL_INSTANCE || 0);
const activated =
  Number(process.env.LISTEN_FDS || 0) > 0 && Number(process.env.LISTEN_PID) === process.pid;

const server = http.createServer((req, res) => {
  res.end(`hello from instance ${instance} (pid ${process.pid})\n`);
});

const where = activated ? { fd: 3 } : { port: Number(process.env.PORT || 3000), host: '127.0.0.1' };
server.listen(where, () => {
  console.log(`instance ${instance} (pid ${process.pid}) serving`);
});

// Stop accepting, let open requests finish, then exit: what a zero-downtime reload needs.
process.on('SIGTERM', () => {
  console.log(`instance ${instance} (pid ${process.pid}) stopping`);
  server.close(() => process.exit(0));
});
