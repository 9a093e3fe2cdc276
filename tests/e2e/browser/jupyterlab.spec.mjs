#!/usr/bin/env node
// Browser end-to-end check: JupyterLab, served by jupyter_server in gateway mode, in headless Chromium.
//
// The kernel runs in the gateway under test; jupyter_server proxies REST and websocket traffic to it.
// Scenarios (SCENARIO):
//   run-interrupt-restart (default): open a notebook, run a cell and read its output, interrupt a cell
//     running time.sleep(60) (Kernel menu), restart the kernel (Kernel menu + confirm dialog) and run a
//     cell in the fresh kernel.
//   gateway-restart: open a notebook, run a cell setting a variable, then hand over to the driving test,
//     which restarts the GATEWAY (kernels kept); then run a cell printing the variable in the same page.
//     No JupyterLab dialog (.jp-Dialog) may appear at any time; every one that appears is recorded.
//     Talks to the test over stdin/stdout lines:
//       spec -> test  "@@ READY_FOR_GATEWAY_RESTART <kernel id>"   (the variable is set)
//       test -> spec  "GATEWAY_RESTARTED <epoch ms of the new gateway's /readyz>"
//       spec -> test  "@@ CELL_AFTER_READYZ_MS <ms> RUNS <n>"  (the cell's output showed that long after
//                     /readyz; n - 1 runs before it were dropped on the way to the kernel)
//
// Environment:
//   SCENARIO       run-interrupt-restart (default) or gateway-restart
//   LAB_URL        base URL of jupyter_server, e.g. http://127.0.0.1:8888   (required)
//   LAB_TOKEN      jupyter_server token (IdentityProvider.token)             (required)
//   NOTEBOOK       notebook path relative to the server root_dir (default e2e.ipynb; it must exist and
//                  hold one empty code cell with a python3 kernelspec)
//   SCREENSHOT     where to write a screenshot on failure (default <tmpdir>/jupyterlab-e2e-failure.png)
//   FINAL_SCREENSHOT  where to write a screenshot of the page when the scenario passes (default: none)
//   RESTART_TIMEOUT_MS  gateway-restart: how long to wait for the test's GATEWAY_RESTARTED line (default 120000)
//   TAKEN_TIMEOUT_MS  gateway-restart: a run of the cell after the restart whose execute_input does not come back
//                  within this is taken as dropped on the way (jupyter_server drops what the page sends while its
//                  own websocket to the gateway is down) and the cell is run again, as a user would (default 2000; the
//                  kernel's execute_input comes back in tens of ms, and a run taken for dropped wrongly is only run twice)
//   CHROMIUM_PATH  browser binary (default /usr/bin/chromium)
//   STEP_TIMEOUT_MS  timeout of each wait (default 30000); TOTAL_TIMEOUT_MS watchdog (default 150000)
//
// Exits 0 on success; on failure prints "FAIL: <step>: <reason>" plus page state, and exits 1.
// Install the browser and node_modules with tests/services/install-browser.sh.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const INSTALL_HINT = 'run tests/services/install-browser.sh (installs Debian chromium and runs npm ci in tests/e2e/browser)';
const LAB_URL = (process.env.LAB_URL || '').replace(/\/+$/, '');
const LAB_TOKEN = process.env.LAB_TOKEN || '';
const NOTEBOOK = process.env.NOTEBOOK || 'e2e.ipynb';
const SCREENSHOT = process.env.SCREENSHOT || path.join(os.tmpdir(), 'jupyterlab-e2e-failure.png');
const FINAL_SCREENSHOT = process.env.FINAL_SCREENSHOT || '';
const SCENARIO = process.env.SCENARIO || 'run-interrupt-restart';
const RESTART_TIMEOUT = Number(process.env.RESTART_TIMEOUT_MS || 120000);
const TAKEN_TIMEOUT = Number(process.env.TAKEN_TIMEOUT_MS || 2000);
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const STEP_TIMEOUT = Number(process.env.STEP_TIMEOUT_MS || 30000);
const TOTAL_TIMEOUT = Number(process.env.TOTAL_TIMEOUT_MS || 150000);
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const t0 = Date.now();
const log = (msg) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s] ${msg}`);

function die(msg) {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
}

if (!LAB_URL || !LAB_TOKEN) die('setup: LAB_URL and LAB_TOKEN must be set');
if (!['run-interrupt-restart', 'gateway-restart'].includes(SCENARIO)) die(`setup: unknown SCENARIO ${SCENARIO}`);
if (!fs.existsSync(CHROMIUM_PATH)) die(`setup: ${CHROMIUM_PATH} not found; ${INSTALL_HINT}`);
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (err) {
  die(`setup: cannot import playwright-core (${err.message}); ${INSTALL_HINT}`);
}

let step = 'launch chromium';
let page;
let context;
const consoleErrors = [];
const wsFrames = []; // last kernel websocket frames, summarised, for failure reports
const kernelIds = new Set(); // kernels the page opened websockets to
let executeInputs = 0; // iopub execute_input frames received: the kernel took an execute_request

function summariseFrame(dir, payload) {
  let text = `${dir} `;
  if (typeof payload !== 'string') {
    text += `<binary ${payload.length} bytes>`;
  } else {
    try {
      const m = JSON.parse(payload);
      const type = (m.header && m.header.msg_type) || m.msg_type;
      const state = m.content && m.content.execution_state ? `:${m.content.execution_state}` : '';
      const parent = m.parent_header && m.parent_header.msg_type ? ` (re ${m.parent_header.msg_type})` : '';
      if (/^debug_/.test(type) || /debug_request/.test(parent)) return; // JupyterLab's debugger probing: noise
      if (type === 'execute_input' && dir.endsWith('<<')) executeInputs += 1;
      text += `${m.channel}/${type}${state}${parent}`;
    } catch {
      text += payload.slice(0, 80);
    }
  }
  wsFrames.push(`${((Date.now() - t0) / 1000).toFixed(1)}s ${text}`);
  if (wsFrames.length > 80) wsFrames.shift();
}
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'kg-e2e-chromium-'));

// ---- page helpers --------------------------------------------------------------------------

const CELLS = '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell';
const cell = (i) => page.locator(CELLS).nth(i);
const KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel"]';

async function prompt(i) {
  return ((await cell(i).locator('.jp-InputArea-prompt').textContent()) || '').replace(/\s+/g, '');
}

async function outputText(i) {
  const out = cell(i).locator('.jp-OutputArea');
  return (await out.count()) ? ((await out.first().innerText()) || '') : '';
}

// JupyterLab's dialog for an iopub status "restarting" (its signal for an automatic restart after a crash).
const DIED_DIALOG = () => page.locator('.jp-Dialog', { hasText: 'appears to have died' });

async function failOnKernelDiedDialog() {
  if (await DIED_DIALOG().count()) {
    const sawRestarting = wsFrames.some((f) => /iopub\/status:restarting/.test(f));
    throw new Error('JupyterLab shows "Kernel Restarting: The kernel appears to have died. It will restart automatically."'
      + (sawRestarting ? ' The browser received an iopub status "restarting" frame (JupyterLab reads it as an automatic'
        + ' restart after a crash; for POST /restart the reference gateway sends only shutdown_reply and status starting/busy/idle).' : ''));
  }
}

// Record the text of every JupyterLab dialog that appears, however briefly (a MutationObserver in the page).
let forbidDialogs = false; // set while no dialog at all may appear (gateway-restart)
async function installDialogRecorder() {
  await page.evaluate(() => {
    window.__kgDialogs = [];
    const open = new Map(); // dialog element -> its record: its text fills in after the element is added
    const textOf = (el) => (el.innerText || el.textContent || '').trim().replace(/\s+/g, ' ');
    const record = () => {
      for (const el of document.querySelectorAll('.jp-Dialog')) {
        if (!open.has(el)) {
          open.set(el, { at: Date.now(), text: '' });
          window.__kgDialogs.push(open.get(el));
        }
      }
      for (const [el, entry] of open) {
        if (!el.isConnected) open.delete(el);
        else if (textOf(el).length > entry.text.length) entry.text = textOf(el);
      }
    };
    record();
    new MutationObserver(record).observe(document.body, { subtree: true, childList: true, characterData: true });
  });
}
const dialogHistory = () => page.evaluate(() => window.__kgDialogs || []);

async function failOnAnyDialog() {
  const dialogs = await dialogHistory();
  if (dialogs.length) {
    throw new Error(`JupyterLab showed ${dialogs.length} dialog(s): `
      + dialogs.map((d) => `${JSON.stringify(d.text)} at ${((d.at - t0) / 1000).toFixed(1)}s`).join('; '));
  }
}

// Poll an async condition (spanning several locators) until it holds; fail early on the "kernel died" dialog
// (and on any dialog while forbidDialogs is set).
async function waitFor(what, predicate, timeout = STEP_TIMEOUT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    await failOnKernelDiedDialog();
    if (forbidDialogs) await failOnAnyDialog();
    last = await predicate();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await page.waitForTimeout(100); // poll interval of a condition wait, not synchronisation
  }
}

async function kernelStatusText() {
  const item = page.locator(KERNEL_STATUS);
  return (await item.count()) ? ((await item.first().textContent()) || '').trim() : '';
}

async function waitKernelIdle(timeout = STEP_TIMEOUT) {
  try {
    await waitFor('kernel status "Idle" in the status bar',
      async () => / \| Idle$/.test(await kernelStatusText()), timeout);
  } catch (err) {
    const lastOpen = wsFrames.map((f) => / open ws /.test(f)).lastIndexOf(true);
    const replies = wsFrames.slice(lastOpen + 1).filter((f) => /shell\/kernel_info_reply/.test(f)).length;
    throw new Error(`${err.message} (status is ${JSON.stringify(await kernelStatusText())}; ${replies} kernel_info_reply`
      + ' frames on the newest kernel websocket: JupyterLab leaves Unknown/Starting only on a kernel_info_reply)');
  }
}

// Record every value of the status bar's kernel status (catches short-lived "Restarting").
async function installStatusRecorder() {
  await page.evaluate((sel) => {
    window.__kgStatus = [];
    const record = () => {
      const el = document.querySelector(sel);
      const text = el ? el.textContent.trim() : '';
      const seen = window.__kgStatus;
      if (!seen.length || seen[seen.length - 1] !== text) seen.push(text);
    };
    record();
    new MutationObserver(record).observe(document.querySelector('.jp-StatusBar-Widget') || document.body,
      { subtree: true, childList: true, characterData: true, attributes: true });
  }, KERNEL_STATUS);
}
const statusHistory = () => page.evaluate(() => window.__kgStatus || []);

async function setCellCode(i, code) {
  const editor = cell(i).locator('.jp-InputArea-editor .cm-content');
  await editor.click();
  await page.keyboard.press('Control+A');
  await page.keyboard.type(code);
  const got = (await editor.innerText()).replace(/\u00a0/g, ' ').trim();
  if (got !== code) throw new Error(`cell ${i} editor holds ${JSON.stringify(got)}, expected ${JSON.stringify(code)}`);
}

// Run cell i in place (Ctrl+Enter) and wait until its prompt changes ("[ ]:" -> "[*]:" or "[n]:").
// JupyterLab sometimes drops a run issued right when the kernel turns idle, so re-issue it if
// the prompt did not change.
async function startCell(i, attempts = 3) {
  const before = await prompt(i);
  for (let attempt = 1; attempt <= attempts; attempt++) {
    await cell(i).locator('.jp-InputArea-editor .cm-content').click();
    await page.keyboard.press('Control+Enter');
    try {
      await waitFor(`cell ${i} prompt to change from ${before}`, async () => (await prompt(i)) !== before, 5000);
      if (attempt > 1) log(`cell ${i}: run started on attempt ${attempt}`);
      return;
    } catch {
      log(`cell ${i}: prompt still ${before} after run #${attempt} (status: ${await kernelStatusText()}); re-issuing`);
    }
  }
  throw new Error(`cell ${i} did not start after ${attempts} run attempts (prompt stayed ${before})`);
}

async function waitCellDone(i, expected, timeout = STEP_TIMEOUT) {
  await waitFor(`cell ${i} to finish with output matching ${expected}`, async () => {
    return /^\[\d+\]:$/.test(await prompt(i)) && expected.test(await outputText(i));
  }, timeout);
  return prompt(i);
}

async function insertCellBelow(i) {
  const n = await page.locator(CELLS).count();
  await cell(i).locator('.jp-InputArea-prompt').click(); // select cell i in command mode
  await page.keyboard.press('Escape');
  await page.keyboard.press('b');
  await waitFor(`a new cell below cell ${i}`, async () => (await page.locator(CELLS).count()) === n + 1, 5000);
}

async function kernelMenu(itemLabel) {
  await page.locator('.lm-MenuBar-item', { has: page.locator('.lm-MenuBar-itemLabel', { hasText: /^Kernel$/ }) }).click();
  const item = page.locator('.lm-Menu .lm-Menu-item', {
    has: page.locator('.lm-Menu-itemLabel', { hasText: itemLabel }),
  });
  await item.first().waitFor({ state: 'visible', timeout: 5000 });
  await item.first().click();
}

async function describePage() {
  if (!page) return '(no page)';
  const lines = [`url: ${page.url()}`];
  try {
    lines.push(`kernel status: ${JSON.stringify(await kernelStatusText())}`);
    lines.push(`status history: ${JSON.stringify(await statusHistory())}`);
    const n = await page.locator(CELLS).count();
    for (let i = 0; i < n; i++) {
      const src = (await cell(i).locator('.jp-InputArea-editor').innerText()).trim();
      lines.push(`cell ${i} ${await prompt(i)} ${JSON.stringify(src)} -> ${JSON.stringify((await outputText(i)).slice(0, 300))}`);
    }
    const dialogs = await page.locator('.jp-Dialog').allInnerTexts();
    if (dialogs.length) lines.push(`dialogs: ${JSON.stringify(dialogs)}`);
    const history = await dialogHistory();
    if (history.length) lines.push(`dialogs seen: ${JSON.stringify(history)}`);
  } catch (err) {
    lines.push(`(page state unavailable: ${err.message})`);
  }
  if (wsFrames.length) lines.push(`last kernel websocket frames:\n  ${wsFrames.join('\n  ')}`);
  if (consoleErrors.length) lines.push(`browser console errors:\n  ${consoleErrors.slice(-15).join('\n  ')}`);
  return lines.join('\n');
}

// ---- talking to the driving test (gateway-restart) -----------------------------------------

const stdinLines = [];
let stdinClosed = false;
function listenStdin() {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => stdinLines.push(line.trim()));
  rl.on('close', () => { stdinClosed = true; });
}

// Wait for a line from the test starting with `word` (while polling the page's dialogs through waitFor).
async function waitForTestLine(word, timeout) {
  const line = await waitFor(`the test's ${word} line on stdin`, async () => {
    const i = stdinLines.findIndex((l) => l.startsWith(`${word}`));
    if (i >= 0) return stdinLines.splice(i, 1)[0];
    if (stdinClosed) throw new Error(`stdin closed before the test sent ${word}`);
    return null;
  }, timeout);
  return line.slice(word.length).trim();
}

const tell = (line) => console.log(`@@ ${line}`);

// ---- the scenarios -------------------------------------------------------------------------

async function launch() {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1400, height: 900 },
  });
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text().slice(0, 300)); });
  page.on('pageerror', (e) => consoleErrors.push(`pageerror: ${e.message.slice(0, 300)}`));
  page.on('websocket', (ws) => {
    if (!/\/api\/kernels\//.test(ws.url())) return;
    kernelIds.add(ws.url().replace(/^.*\/api\/kernels\/([^/?]+).*$/, '$1'));
    const id = ws.url().replace(/^.*session_id=/, '').slice(0, 8);
    wsFrames.push(`${((Date.now() - t0) / 1000).toFixed(1)}s open ws ${id}`);
    ws.on('framesent', (f) => summariseFrame(`${id} >>`, f.payload));
    ws.on('framereceived', (f) => summariseFrame(`${id} <<`, f.payload));
    ws.on('socketerror', (e) => wsFrames.push(`${((Date.now() - t0) / 1000).toFixed(1)}s ${id} socket error ${e}`));
    ws.on('close', () => wsFrames.push(`${((Date.now() - t0) / 1000).toFixed(1)}s ${id} closed`));
  });

  step = 'open notebook';
  const url = `${LAB_URL}/lab/tree/${NOTEBOOK.split('/').map(encodeURIComponent).join('/')}?token=${encodeURIComponent(LAB_TOKEN)}`;
  log(`opening ${url.replace(/token=[^&]+/, 'token=***')}`);
  await page.goto(url, { timeout: 60000 });
  await cell(0).waitFor({ state: 'visible', timeout: 60000 });
  await page.locator('.jp-StatusBar-Widget').waitFor({ timeout: 60000 });
  await installStatusRecorder();
  await installDialogRecorder();
  await waitKernelIdle(60000);
  log(`notebook open, kernel: ${await kernelStatusText()}`);
}

async function runInterruptRestart() {
  step = 'run a cell and see its output';
  await setCellCode(0, 'marker = 6 * 7; print("e2e-output", marker)');
  await startCell(0);
  const p0 = await waitCellDone(0, /e2e-output 42/);
  log(`cell 0 ran: ${p0} ${JSON.stringify((await outputText(0)).trim())}`);

  step = 'interrupt a running cell: start time.sleep(60)';
  await insertCellBelow(0);
  await setCellCode(1, 'import time; print("sleeping", flush=True); time.sleep(60)');
  await startCell(1);
  await waitFor('cell 1 to be running (prompt [*], output "sleeping")',
    async () => (await prompt(1)) === '[*]:' && /sleeping/.test(await outputText(1)));
  step = 'interrupt a running cell: Kernel menu > Interrupt Kernel';
  const tInterrupt = Date.now();
  await kernelMenu(/^Interrupt Kernel$/);
  const p1 = await waitCellDone(1, /KeyboardInterrupt/);
  const interruptSecs = (Date.now() - tInterrupt) / 1000;
  if (interruptSecs > 20) throw new Error(`interrupt took ${interruptSecs}s`);
  await waitKernelIdle();
  log(`cell 1 interrupted after ${interruptSecs.toFixed(1)}s: ${p1} KeyboardInterrupt`);

  step = 'restart the kernel: Kernel menu';
  const mark = (await statusHistory()).length;
  await kernelMenu(/^Restart Kernel/);
  step = 'restart the kernel: confirm dialog';
  const dialog = page.locator('.jp-Dialog', { has: page.locator('.jp-Dialog-header', { hasText: /Restart Kernel\?/ }) });
  await waitFor('the "Restart Kernel?" dialog', async () => (await dialog.count()) === 1, 5000);
  await dialog.locator('button.jp-mod-accept').click();
  await waitFor('the "Restart Kernel?" dialog to close', async () => (await dialog.count()) === 0, 5000);
  step = 'restart the kernel: wait for the kernel';
  // The status bar must pass through a non-idle state (restarting/starting) and come back to Idle.
  await waitFor('kernel status to leave Idle after the restart', async () =>
    (await statusHistory()).slice(mark).some((s) => !/ \| Idle$/.test(s)));
  await waitFor('kernel status back to Idle after the restart', async () => {
    const hist = (await statusHistory()).slice(mark);
    const firstBusy = hist.findIndex((s) => !/ \| Idle$/.test(s));
    return firstBusy >= 0 && hist.slice(firstBusy).some((s) => / \| Idle$/.test(s))
      && / \| Idle$/.test(await kernelStatusText());
  }, 60000);
  log(`kernel restarted, status went ${JSON.stringify((await statusHistory()).slice(mark))}`);

  step = 'run a cell after the restart';
  await insertCellBelow(1);
  await setCellCode(2, 'print("after-restart", "marker" in globals(), 6 * 7)');
  await startCell(2);
  const p2 = await waitCellDone(2, /after-restart False 42/);
  log(`cell 2 ran in the fresh kernel: ${p2} ${JSON.stringify((await outputText(2)).trim())}`);
}

async function runGatewayRestart() {
  listenStdin();
  forbidDialogs = true; // from the first cell on, any dialog fails the scenario
  step = 'set a variable';
  await setCellCode(0, 'kept = 6 * 7; print("before-gateway-restart", kept)');
  await startCell(0);
  const p0 = await waitCellDone(0, /before-gateway-restart 42/);
  await waitKernelIdle();
  if (kernelIds.size !== 1) throw new Error(`expected websockets to one kernel, saw ${[...kernelIds]}`);
  const [kernelId] = kernelIds;
  log(`cell 0 ran: ${p0} ${JSON.stringify((await outputText(0)).trim())} (kernel ${kernelId})`);

  step = 'wait while the test restarts the gateway (polling for dialogs)';
  const mark = (await statusHistory()).length;
  tell(`READY_FOR_GATEWAY_RESTART ${kernelId}`);
  const readyAt = Number(await waitForTestLine('GATEWAY_RESTARTED', RESTART_TIMEOUT));
  if (!Number.isFinite(readyAt) || readyAt <= 0) throw new Error('GATEWAY_RESTARTED without an epoch-ms time');
  log(`the test restarted the gateway; its /readyz answered ${Date.now() - readyAt} ms ago`);

  step = 'run a cell printing the variable after the gateway restart';
  // At once, like a user who runs a cell as soon as the gateway is back. The page's websocket (to jupyter_server)
  // never closed, so JupyterLab shows nothing of the restart; jupyter_server reconnects to the gateway after its
  // own back-off and drops what the page sends before that. A run the kernel did not take is run again.
  await insertCellBelow(0);
  await setCellCode(1, 'print("after-gateway-restart", kept)');
  const runsDeadline = Date.now() + 90000;
  let runs = 0;
  for (;;) {
    const taken = executeInputs;
    runs += 1;
    const ranAt = Date.now() - readyAt;
    if (runs === 1) {
      await startCell(1);
    } else { // the cell shows [*] already: startCell's prompt check does not apply
      await cell(1).locator('.jp-InputArea-editor .cm-content').click();
      await page.keyboard.press('Control+Enter');
    }
    try {
      await waitFor(`the kernel to take run #${runs} of cell 1 (an iopub execute_input)`,
        async () => executeInputs > taken, TAKEN_TIMEOUT);
      break;
    } catch (err) {
      if (!/timed out/.test(err.message) || Date.now() > runsDeadline) throw err;
      log(`run #${runs} of cell 1 (sent ${ranAt} ms after /readyz) was not taken by the kernel within ${TAKEN_TIMEOUT} ms:`
        + ' dropped on the way (jupyter_server reconnecting to the gateway); running the cell again');
    }
  }
  const p1 = await waitCellDone(1, /after-gateway-restart 42/, 60000);
  const afterReadyz = Date.now() - readyAt;
  log(`cell 1 ran: ${p1} ${JSON.stringify((await outputText(1)).trim())}, ${afterReadyz} ms after the new gateway's`
    + ` /readyz, on run #${runs}`);
  tell(`CELL_AFTER_READYZ_MS ${afterReadyz} RUNS ${runs}`);
  await waitKernelIdle();

  step = 'check the page after the gateway restart';
  await failOnAnyDialog();
  if (kernelIds.size !== 1) throw new Error(`the page opened websockets to other kernels: ${[...kernelIds]}`);
  const statuses = (await statusHistory()).slice(mark);
  log(`kernel status during the restart: ${JSON.stringify(statuses)}; no dialog appeared`);
  if (/^\[\*\]:$/.test(await prompt(0)) || !/before-gateway-restart 42/.test(await outputText(0))) {
    throw new Error('cell 0 lost its output or prompt');
  }
}

async function run() {
  await launch();
  await (SCENARIO === 'gateway-restart' ? runGatewayRestart() : runInterruptRestart());
  if (FINAL_SCREENSHOT) {
    fs.mkdirSync(path.dirname(FINAL_SCREENSHOT), { recursive: true });
    await page.screenshot({ path: FINAL_SCREENSHOT, fullPage: true, timeout: 10000 });
    log(`screenshot: ${FINAL_SCREENSHOT}`);
  }
}

let failed = null;
const watchdog = setTimeout(() => { failed = failed || new Error(`total timeout ${TOTAL_TIMEOUT} ms`); finish(); }, TOTAL_TIMEOUT);
let finishing = false;

async function finish() {
  if (finishing) return;
  finishing = true;
  clearTimeout(watchdog);
  let code = 0;
  if (failed) {
    code = 1;
    const state = await Promise.race([describePage(), new Promise((r) => setTimeout(() => r('(page state timed out)'), 10000))]);
    try {
      if (page) {
        fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
        await page.screenshot({ path: SCREENSHOT, fullPage: true, timeout: 10000 });
        console.error(`screenshot: ${SCREENSHOT}`);
      }
    } catch (err) {
      console.error(`(screenshot failed: ${err.message})`);
    }
    console.error(`FAIL: ${step}: ${failed.message.split('\n')[0]}\n${state}`);
  } else {
    log(SCENARIO === 'gateway-restart'
      ? 'PASS: open notebook, set a variable, gateway restarted, variable printed, no dialog'
      : 'PASS: open notebook, run cell, interrupt, restart, run cell');
  }
  try {
    if (context) await Promise.race([context.close(), new Promise((r) => setTimeout(r, 10000))]);
  } catch { /* browser already gone */ }
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(code);
}

try {
  await run();
} catch (err) {
  failed = err;
}
await finish();
