// A tiny HTTP app for the demo. Each instance listens on PORT_BASE + its instance index
// (fork mode: every instance needs its own port until cluster mode shares one).
const http = require('http');

const instance = Number(process.env.CORRAL_INSTANCE || 0);
const port = Number(process.env.PORT_BASE || 3000) + instance;

http
  .createServer((req, res) => {
    res.end(`hello from ${process.env.CORRAL_APP} instance ${instance} (pid ${process.pid})\n`);
  })
  .listen(port, '127.0.0.1', () => {
    console.log(`instance ${instance} listening on 127.0.0.1:${port}`);
  });

process.on('SIGTERM', () => {
  console.log(`instance ${instance} stopping`);
  process.exit(0);
});
