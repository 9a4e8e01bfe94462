// One long-lived headless Chromium, driven by playwright-core, for a whole pytest session.
//
// Protocol: JSON lines.  Python writes {"id": N, "cmd": "...", ...args} to stdin; we answer
// {"id": N, "ok": true, "result": ...} or {"id": N, "ok": false, "error": "..."} on stdout.
// The first line we print is {"ready": true, "version": "<chromium version>"}.
// Each noVNC viewer is a "session": its own page in one shared browser context.
// Keys and mouse go through Playwright's real input pipeline (CDP Input.dispatch*Event), so
// noVNC sees genuine KeyboardEvent/MouseEvent objects with the browser's key/code values.
//
// usage: node novnc_driver.mjs <dir holding node_modules/playwright-core>
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';

const jsRoot = process.argv[2];
const require = createRequire(path.join(jsRoot, 'package.json'));
const { chromium } = require('playwright-core');

// Flags from /work/shared/notes/real-clients.md: root needs --no-sandbox; small /dev/shm;
// no GPU; nothing talking to the network; sRGB so canvas pixels are what noVNC drew.
const ARGS = [
  '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--no-first-run', '--disable-quic', '--force-color-profile=srgb',
  '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];

const browser = await chromium.launch({
  executablePath: process.env.DMORE_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ARGS,
});
const sessions = new Map();
// One context (one HTTP cache) for all viewers: loading noVNC's modules once is enough.
// Each viewer still gets its own page, hence its own noVNC instance and websocket.
let sharedContext = null;

function out(obj) { process.stdout.write(JSON.stringify(obj) + '\n'); }

function sess(id) {
  const s = sessions.get(id);
  if (!s) throw new Error('no session ' + id);
  return s;
}

async function canvasPoint(page, x, y) {
  const b = await page.evaluate(() => window.dmore.canvasBox());
  // +0.5: the centre of framebuffer pixel (x, y); noVNC floors client -> framebuffer coords.
  return [b.left + x + 0.5, b.top + y + 0.5];
}

const BUTTONS = { 1: 'left', 2: 'middle', 3: 'right' };

const handlers = {
  async open({ session, pageUrl, opts, viewport, timeoutMs }) {
    if (sessions.has(session)) throw new Error('session exists: ' + session);
    if (sharedContext === null) {
      sharedContext = await browser.newContext({ deviceScaleFactor: 1 });
    }
    const page = await sharedContext.newPage();
    await page.setViewportSize(viewport);
    const s = { page, console: [] };
    sessions.set(session, s);
    page.on('console', (m) => { s.console.push(m.type() + ': ' + m.text()); });
    page.on('pageerror', (e) => { s.console.push('pageerror: ' + e.message); });
    page.on('dialog', (d) => { s.console.push('dialog: ' + d.message()); d.dismiss(); });
    const t0 = Date.now();
    await page.goto(pageUrl, { timeout: timeoutMs });
    await page.waitForFunction(() => window.dmoreReady === true, null, { timeout: timeoutMs });
    const t1 = Date.now();
    await page.evaluate((o) => window.dmore.connect(o), opts);
    // Wait for the outcome of the handshake: connected (and first update), or failure.
    await page.waitForFunction(() => {
      const st = window.dmore.state();
      return st.state === 'failed' || st.state === 'disconnected' ||
             (st.state === 'connected' && st.updates >= 1);
    }, null, { timeout: timeoutMs, polling: 10 });
    const st = await page.evaluate(() => window.dmore.state());
    st.timing = { pageMs: t1 - t0, connectMs: Date.now() - t1 };
    return st;
  },
  async state({ session }) {
    const s = sess(session);
    const st = await s.page.evaluate(() => window.dmore.state());
    st.console = s.console.slice(-50);
    return st;
  },
  async waitUpdates({ session, target, timeoutMs }) {
    return await sess(session).page.evaluate(
      ([t, ms]) => window.dmore.waitUpdates(t, ms), [target, timeoutMs]);
  },
  async pixels({ session }) {
    return await sess(session).page.evaluate(() => window.dmore.pixels());
  },
  async key({ session, action, key, text, delayMs }) {
    const { page } = sess(session);
    const focused = await page.evaluate(() => window.dmore.focus());
    if (!focused) throw new Error('noVNC canvas did not take the keyboard focus');
    const kb = page.keyboard;
    if (action === 'press') await kb.press(key, { delay: delayMs || 0 });
    else if (action === 'down') await kb.down(key);
    else if (action === 'up') await kb.up(key);
    else if (action === 'type') await kb.type(text, { delay: delayMs || 0 });
    else throw new Error('unknown key action ' + action);
    return true;
  },
  async mouse({ session, action, x, y, button, dx, dy }) {
    const { page } = sess(session);
    const m = page.mouse;
    const b = BUTTONS[button || 1];
    if (x !== undefined && x !== null) {
      const [cx, cy] = await canvasPoint(page, x, y);
      await m.move(cx, cy);
    }
    if (action === 'move') { /* done above */ }
    else if (action === 'down') await m.down({ button: b });
    else if (action === 'up') await m.up({ button: b });
    else if (action === 'click') { await m.down({ button: b }); await m.up({ button: b }); }
    else if (action === 'wheel') await m.wheel(dx || 0, dy || 0);
    else throw new Error('unknown mouse action ' + action);
    return true;
  },
  async disconnect({ session }) {
    return await sess(session).page.evaluate(() => window.dmore.disconnect());
  },
  async close({ session }) {
    const s = sessions.get(session);
    if (!s) return false;
    sessions.delete(session);
    await s.page.close();
    return true;
  },
  async quit() {
    sessions.clear();
    if (sharedContext !== null) await sharedContext.close().catch(() => {});
    await browser.close();
    setImmediate(() => process.exit(0));
    return true;
  },
};

out({ ready: true, version: browser.version() });

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', async (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    out({ id: null, ok: false, error: 'bad JSON: ' + e.message });
    return;
  }
  try {
    const h = handlers[msg.cmd];
    if (!h) throw new Error('unknown command ' + msg.cmd);
    out({ id: msg.id, ok: true, result: await h(msg) });
  } catch (e) {
    out({ id: msg.id, ok: false, error: String(e && e.stack ? e.stack : e) });
  }
});
// Python went away: do not leave a browser behind.
rl.on('close', async () => {
  await browser.close().catch(() => {});
  process.exit(0);
});
