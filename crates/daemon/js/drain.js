// corral's drain for Node.js cluster workers.
//
// corral loads this file with `--require` into the Node apps it runs in cluster mode (set
// CORRAL_NODE_DRAIN=off in an app's env to leave it out). It changes one thing, and only once the
// worker has been told to disconnect (a reload, a stop, a scale-down): how its HTTP servers end
// their keep-alive connections.
//
// Node's own `server.close()` destroys the connections it sees as idle at that instant. A client
// may have a request on its way on one of them, and that request fails. Here instead every next
// response carries `Connection: close` and ends its connection, so a client learns of the end in
// an answer, and the connections still idle after a grace period (CORRAL_DRAIN_GRACE_MS, 1000 by
// default) are closed then, as an idle keep-alive timeout would close them.
'use strict';

const cluster = require('cluster');

if (cluster.isWorker) {
  const grace = Number(process.env.CORRAL_DRAIN_GRACE_MS) || 1000;

  const drainOnClose = (proto) => {
    const ownClose = proto.close;
    const listenerClose = Object.getPrototypeOf(proto).close;
    proto.close = function close(...args) {
      if (!cluster.worker || !cluster.worker.exitedAfterDisconnect) {
        return ownClose.apply(this, args);
      }
      this.prependListener('request', (req, res) => {
        res.shouldKeepAlive = false;
      });
      if (typeof this.closeIdleConnections === 'function') {
        setTimeout(() => this.closeIdleConnections(), grace).unref();
      }
      return listenerClose.apply(this, args);
    };
  };

  drainOnClose(require('http').Server.prototype);
  drainOnClose(require('https').Server.prototype);
}
