// Helpers shared by the browser test and the dashboard benchmark: the `atelier` binary to
// run, a free port, and waiting for a started studio to answer `/api/health`.

import { execFileSync } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';

/** The repository root: ATELIER_ROOT, else two folders up from here. */
export const root = process.env.ATELIER_ROOT ?? path.resolve(import.meta.dirname, '../..');

/** The server binary: ATELIER_BIN, else target/debug/atelier as `cargo metadata` places it. */
export function serverBinary() {
  if (process.env.ATELIER_BIN) return process.env.ATELIER_BIN;
  const meta = JSON.parse(
    execFileSync('cargo', ['metadata', '--format-version', '1', '--no-deps'], { cwd: root, encoding: 'utf8' }),
  );
  return path.join(meta.target_directory, 'debug', 'atelier');
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves once `url`/api/health answers 200; rejects if `server` exits or after `timeoutMs`. */
export async function waitForHealth(url, server, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (server.exitCode !== null) throw new Error(`atelier exited early with ${server.exitCode}`);
    try {
      if ((await fetch(`${url}/api/health`)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`server at ${url} did not become healthy in ${timeoutMs} ms`);
}
