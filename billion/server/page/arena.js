// The billion arena: type once, and every engine the server serves (<model>@<engine>) answers in its
// own column, streaming, at the same time. Plain browser APIs only (fetch, streams, localStorage):
// nothing to build, nothing fetched from anywhere but this server.
//
// A conversation is {id, title, created, turns: [{user, replies: {model id: reply}}]}: the user's
// messages are shared, each engine keeps its own replies, so each column is a conversation of its
// own. A reply is {text, tokens: [[text, logprob, [[alternative, logprob], ...]]], finish, error,
// ttftMs, serverTtftMs, tokS, requestId}; the tokens are the ones the server streams (logprobs),
// compared across columns to mark where the replies part.

const $ = (selector, root = document) => root.querySelector(selector);
const STORE = { conversations: 'billion.conversations', current: 'billion.current', settings: 'billion.settings',
                models: 'billion.models', key: 'billion.apiKey' };
const TOP_ALTERNATIVES = 5;

function load(key, fallback) {
  try { const value = localStorage.getItem(key); return value === null ? fallback : JSON.parse(value); }
  catch { return fallback; }
}
function save(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); }
  catch (e) { notice(`Could not keep the conversations in this browser (${e.message}); export them to keep them.`); }
}

const state = {
  served: [],                               // model ids from /v1/models
  selected: load(STORE.models, null),       // the columns
  conversations: load(STORE.conversations, []),
  current: load(STORE.current, null),       // the id of the conversation shown
  running: new Set(),                       // AbortControllers of the requests in flight
  views: new Map(),                         // turn -> {model id -> its elements}
};

// ---------------------------------------------------------------- the server

function headers() {
  const key = $('#api-key').value.trim();
  return { 'Content-Type': 'application/json', ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function refusal(response) {
  // A non-2xx answer, in plain words; the server's own message (OpenAI's error shape) kept.
  let message = '';
  try { message = (await response.json()).error?.message || ''; } catch { /* not JSON */ }
  const s = response.status;
  if (s === 400) return `The server refused this request: ${message}`;
  if (s === 401) return `This server needs a valid API key: type it in the API key field at the top. (${message})`;
  if (s === 413) return `The request is too large for this server: ${message}`;
  if (s === 429) {
    const wait = response.headers.get('Retry-After');
    return `The server is busy with other requests (429): try again${wait ? ` in ${wait} s` : ' shortly'}. (${message})`;
  }
  if (s === 503) return `The server cannot answer now (503): ${message}`;
  return `The server failed on this request (${s}): ${message || response.statusText}`;
}

async function loadModels() {
  let response;
  try { response = await fetch('/v1/models', { headers: headers() }); }
  catch (e) { return notice(`Cannot reach the server: ${e.message}`); }
  if (!response.ok) return notice(await refusal(response));
  notice('');
  state.served = (await response.json()).data.map(m => m.id);
  // With one engine the server also answers to the plain model name: one column, not two.
  const engines = state.served.filter(id => id.includes('@'));
  const kept = (state.selected || []).filter(id => state.served.includes(id));
  state.selected = kept.length ? kept : (engines.length ? engines : state.served.slice(0, 1));
  renderModels();
  renderColumns();
}

function readSettings() {
  // The settings form as request fields, or null (and a notice) when one cannot be sent.
  const form = $('#settings');
  const value = name => form.querySelector(`[name=${name}]`).value;
  save(STORE.settings, Object.fromEntries([...form.querySelectorAll('[name]')].map(el => [el.name, el.value])));
  const fields = { temperature: Number(value('temperature') || 0), top_p: Number(value('top_p') || 1),
                   max_tokens: Number(value('max_tokens') || 256) };
  if (Number(value('top_k')) > 0) fields.top_k = Number(value('top_k'));
  if (value('seed') !== '') fields.seed = Number(value('seed'));
  const stops = value('stop').split('\n').filter(s => s.length);
  if (stops.length) fields.stop = stops;
  const schemaBox = form.querySelector('[name=schema]');
  schemaBox.classList.remove('invalid');
  if (schemaBox.value.trim()) {
    try {
      fields.response_format = { type: 'json_schema',
                                 json_schema: { name: 'page_schema', schema: JSON.parse(schemaBox.value), strict: true } };
    } catch (e) {
      schemaBox.classList.add('invalid');
      form.open = true;
      notice(`The JSON schema is not valid JSON: ${e.message}`);
      return null;
    }
  }
  return { system: value('system').trim(), fields };
}

function messages(conversation, turn, model, system) {
  // What this column has seen: the shared user messages and this engine's own earlier replies; a
  // turn this engine did not answer (refused, failed, or sent before its column was shown) is left out.
  const out = system ? [{ role: 'system', content: system }] : [];
  for (const t of conversation.turns) {
    if (t === turn) break;
    const reply = t.replies[model];
    if (reply && !reply.error && reply.text) {
      out.push({ role: 'user', content: t.user }, { role: 'assistant', content: reply.text });
    }
  }
  out.push({ role: 'user', content: turn.user });
  return out;
}

async function* serverSentEvents(response) {
  // The JSON payloads of an SSE stream, as they arrive.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter(l => l.startsWith('data:')).map(l => l.slice(5).trim()).join('\n');
      if (data === '[DONE]') return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function stream(conversation, turn, model, settings, t0) {
  const reply = turn.replies[model] = { text: '', tokens: [], finish: null, error: null, ttftMs: null,
                                        serverTtftMs: null, tokS: null, requestId: null };
  const controller = new AbortController();
  // the request leaves before anything is drawn: drawing is not part of the time to first token
  const sent = fetch('/v1/chat/completions', {
    method: 'POST', headers: headers(), signal: controller.signal,
    body: JSON.stringify({ model, messages: messages(conversation, turn, model, settings.system), stream: true,
                           stream_options: { include_usage: true }, logprobs: true,
                           top_logprobs: TOP_ALTERNATIVES, ...settings.fields }) });
  state.running.add(controller);
  let first = null;
  try {
    const response = await sent;
    reply.requestId = response.headers.get('X-Request-ID');
    if (!response.ok) {
      reply.error = await refusal(response);
      return;
    }
    const timing = /ttft;dur=([\d.]+)/.exec(response.headers.get('Server-Timing') || '');
    reply.serverTtftMs = timing ? Number(timing[1]) : null;
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) {  // the answer had begun: the server reports its failure in the stream
        reply.error = `The server failed during the answer: ${chunk.error.message}`;
        break;
      }
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const content = choice.delta?.content || '';
      reply.text += content;
      const entries = choice.logprobs?.content;
      if (entries?.length) {
        for (const e of entries) {
          reply.tokens.push([e.token, e.logprob, (e.top_logprobs || []).map(t => [t.token, t.logprob])]);
        }
      } else if (content) {
        reply.tokens.push([content, null, []]);
      }
      if (reply.tokens.length && first === null) {
        first = performance.now();
        // on screen: measured in the frame that paints it
        requestAnimationFrame(() => { reply.ttftMs = performance.now() - t0; update(turn, model); });
      }
      if (reply.tokens.length > 1) reply.tokS = (reply.tokens.length - 1) / ((performance.now() - first) / 1000);
      if (choice.finish_reason) reply.finish = choice.finish_reason;
      update(turn, model);
    }
    if (!reply.finish && !reply.error) reply.error = 'The connection closed before the answer was complete.';
  } catch (e) {
    if (controller.signal.aborted) reply.finish = 'stopped';
    else reply.error = `The connection to the server was lost (${e.message}).`;
  } finally {
    state.running.delete(controller);
    update(turn, model);
    persist();
    updateButtons();
  }
}

// ---------------------------------------------------------------- actions

function current() {
  return state.conversations.find(c => c.id === state.current) || null;
}

function persist() {
  save(STORE.conversations, state.conversations);
  save(STORE.current, state.current);
}

function blankConversation() {
  const conversation = { id: crypto.randomUUID(), title: 'New conversation', created: new Date().toISOString(), turns: [] };
  state.conversations.unshift(conversation);
  state.current = conversation.id;
  return conversation;
}

function newConversation() {
  blankConversation();
  persist();
  renderAll();
}

function run(conversation, turn, settings, t0) {
  if (!state.selected.length) return notice('Choose at least one engine above.');
  notice('');
  turn.replies = {};
  for (const model of state.selected) stream(conversation, turn, model, settings, t0);
  renderColumns();
  updateButtons();
}

function send(t0) {
  const box = $('#prompt');
  const text = box.value.trim();
  if (!text || state.running.size) return;
  const settings = readSettings();
  if (!settings) return;
  const conversation = current() || blankConversation();
  const turn = { user: text, replies: {} };
  conversation.turns.push(turn);
  if (conversation.turns.length === 1) conversation.title = text.slice(0, 48);
  box.value = '';
  run(conversation, turn, settings, t0);  // the requests leave first; saving and drawing follow
  persist();
  renderSidebar();
}

function regenerate(t0) {
  const conversation = current();
  const settings = !state.running.size && conversation?.turns.length && readSettings();
  if (settings) run(conversation, conversation.turns.at(-1), settings, t0);
}

function stop() {
  for (const controller of state.running) controller.abort();  // the server drops each at its next step
}

function exportAll() {
  const blob = new Blob([JSON.stringify({ exported: new Date().toISOString(), conversations: state.conversations },
                                        null, 2)], { type: 'application/json' });
  const link = Object.assign(document.createElement('a'),
                             { href: URL.createObjectURL(blob), download: 'billion-conversations.json' });
  link.click();
  URL.revokeObjectURL(link.href);
}

// ---------------------------------------------------------------- drawing

function notice(text) {
  const box = $('#notice');
  box.textContent = text;
  box.hidden = !text;
}

function updateButtons() {
  const busy = state.running.size > 0;
  $('#stop').disabled = !busy;
  $('#send').disabled = busy;
  $('#regenerate').disabled = busy || !current()?.turns.length;
}

function renderAll() {
  renderSidebar();
  renderColumns();
  updateButtons();
}

function renderModels() {
  const box = $('#models');
  box.replaceChildren(Object.assign(document.createElement('legend'), { textContent: 'Engines' }));
  for (const id of state.served) {
    const label = document.createElement('label');
    const check = Object.assign(document.createElement('input'), { type: 'checkbox', value: id,
                                                                  checked: state.selected.includes(id) });
    check.addEventListener('change', () => {
      state.selected = state.served.filter(m => m === check.value ? check.checked : state.selected.includes(m));
      save(STORE.models, state.selected);
      renderColumns();
    });
    label.append(check, ` ${id}`);
    box.append(label);
  }
}

function renderSidebar() {
  const list = $('#conversations');
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = document.createElement('li');
    item.classList.toggle('current', conversation.id === state.current);
    const title = Object.assign(document.createElement('button'), { className: 'title', type: 'button',
                                                                     textContent: conversation.title });
    title.addEventListener('click', () => { state.current = conversation.id; persist(); renderAll(); });
    const rename = Object.assign(document.createElement('button'), { className: 'small rename', type: 'button',
                                                                      textContent: '✎', title: 'Rename' });
    rename.addEventListener('click', () => {
      const input = Object.assign(document.createElement('input'), { value: conversation.title });
      const done = keep => { if (keep && input.value.trim()) conversation.title = input.value.trim(); persist(); renderSidebar(); };
      input.addEventListener('keydown', e => {
        if (e.key === 'Enter') done(true);
        if (e.key === 'Escape') { e.stopPropagation(); done(false); }
      });
      input.addEventListener('blur', () => done(true));
      item.replaceChildren(input);
      input.focus();
      input.select();
    });
    const remove = Object.assign(document.createElement('button'), { className: 'small delete', type: 'button',
                                                                      textContent: '✕', title: 'Delete' });
    remove.addEventListener('click', () => {
      state.conversations = state.conversations.filter(c => c !== conversation);
      if (state.current === conversation.id) state.current = state.conversations[0]?.id || null;
      persist();
      renderAll();
    });
    item.append(title, rename, remove);
    list.append(item);
  }
}

function renderColumns() {
  const columns = $('#columns');
  columns.replaceChildren();
  state.views = new Map();
  const conversation = current();
  for (const model of state.selected || []) {
    const column = document.createElement('div');
    column.className = 'column';
    column.dataset.model = model;
    const transcript = Object.assign(document.createElement('div'), { className: 'transcript' });
    column.append(Object.assign(document.createElement('h2'), { textContent: model }), transcript);
    for (const turn of conversation?.turns || []) {
      transcript.append(Object.assign(document.createElement('div'), { className: 'user', textContent: turn.user }));
      const reply = Object.assign(document.createElement('div'), { className: 'reply' });
      const metrics = Object.assign(document.createElement('div'), { className: 'metrics' });
      transcript.append(reply, metrics);
      if (!state.views.has(turn)) state.views.set(turn, {});
      state.views.get(turn)[model] = { reply, metrics, transcript, shown: 0 };
      update(turn, model);
    }
    columns.append(column);
  }
}

function update(turn, model) {
  // Draw what is new in one column's reply (tokens are appended, never redrawn), then the marks.
  const view = state.views.get(turn)?.[model];
  const reply = turn.replies[model];
  if (!view || !reply) return;
  view.reply._reply = reply;
  for (; view.shown < reply.tokens.length; view.shown++) {
    const span = Object.assign(document.createElement('span'), { className: 'tok',
                                                                 textContent: reply.tokens[view.shown][0] });
    span.dataset.i = view.shown;
    view.reply.append(span);
  }
  if (reply.error && !view.reply.querySelector('.error')) {
    view.reply.append(Object.assign(document.createElement('div'), { className: 'error', textContent: reply.error }));
  }
  markDivergence(turn);
  // every column's line: the mark may have moved in a column that finished before this one started
  for (const [m, v] of Object.entries(state.views.get(turn))) {
    if (turn.replies[m]) drawMetrics(v, turn.replies[m]);
  }
  view.transcript.scrollTop = view.transcript.scrollHeight;
}

function drawMetrics(view, reply) {
  const parts = [];
  if (reply.ttftMs !== null) {
    parts.push(`TTFT ${reply.ttftMs.toFixed(0)} ms` +
               (reply.serverTtftMs !== null ? ` (server ${reply.serverTtftMs.toFixed(0)} ms)` : ''));
  }
  if (reply.tokS !== null) parts.push(`${reply.tokS.toFixed(1)} tok/s`);
  if (reply.tokens.length) parts.push(`${reply.tokens.length} tokens`);
  if (reply.finish) parts.push(reply.finish === 'stopped' ? 'stopped' : `finish: ${reply.finish}`);
  if (!parts.length && !reply.error) parts.push('waiting…');
  if (view.reply.dataset.diverge) parts.push(`differs from token ${Number(view.reply.dataset.diverge) + 1}`);
  view.metrics.textContent = parts.join(' · ');
  Object.assign(view.metrics.dataset, { count: reply.tokens.length, finish: reply.finish || '',
                                        ttft: reply.ttftMs ?? '', serverTtft: reply.serverTtftMs ?? '' });
}

function markDivergence(turn) {
  // The first token where the columns' replies part, marked in each; none while they agree. A reply
  // that ended (not stopped, not failed) shorter than another parts from it where it ended.
  const views = state.views.get(turn) || {};
  const models = Object.keys(views).filter(m => turn.replies[m] && !turn.replies[m].error
                                            && turn.replies[m].finish !== 'stopped');
  for (const m of Object.keys(views)) {
    views[m].reply.querySelectorAll('.diverge').forEach(el => el.classList.remove('diverge'));
    delete views[m].reply.dataset.diverge;
  }
  if (models.length < 2) return;
  const tokens = models.map(m => turn.replies[m].tokens.map(t => t[0]));
  const shortest = Math.min(...tokens.map(t => t.length));
  let i = 0;
  while (i < shortest && tokens.every(t => t[i] === tokens[0][i])) i++;
  const parted = i < shortest ||
    (models.some((m, k) => turn.replies[m].finish && tokens[k].length === i) && tokens.some(t => t.length > i));
  if (!parted) return;
  for (const m of models) {
    views[m].reply.dataset.diverge = i;
    views[m].reply.querySelector(`.tok[data-i="${i}"]`)?.classList.add('diverge');
  }
}

function showTip(event) {
  const tip = $('#tip');
  const span = event.target.closest?.('.tok');
  const reply = span?.parentElement._reply;
  if (!reply) { tip.hidden = true; return; }
  const [text, logprob, top] = reply.tokens[Number(span.dataset.i)];
  const percent = lp => (lp === null || lp === undefined ? '?' : `${(100 * Math.exp(lp)).toFixed(1)}%`);
  const table = document.createElement('table');
  const rows = top.length ? top : [[text, logprob]];
  for (const [alternative, lp] of rows) {
    const row = table.insertRow();
    row.className = alternative === text ? 'chosen' : '';
    row.insertCell().textContent = JSON.stringify(alternative);
    row.insertCell().textContent = percent(lp);
  }
  tip.replaceChildren(Object.assign(document.createElement('div'),
                                    { textContent: `${JSON.stringify(text)}: p = ${percent(logprob)}` }), table);
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, innerWidth - 330)}px`;
  tip.style.top = `${event.clientY + 16}px`;
}

// ---------------------------------------------------------------- wiring

function start() {
  const saved = load(STORE.settings, {});
  for (const el of $('#settings').querySelectorAll('[name]')) if (el.name in saved) el.value = saved[el.name];
  $('#settings').addEventListener('change', () => readSettings());
  const key = $('#api-key');
  key.value = load(STORE.key, '');
  key.addEventListener('change', () => { save(STORE.key, key.value); loadModels(); });
  $('#composer').addEventListener('submit', e => { e.preventDefault(); send(e.timeStamp); });
  $('#prompt').addEventListener('keydown', e => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(e.timeStamp); }
  });
  document.addEventListener('keydown', e => { if (e.key === 'Escape') stop(); });
  $('#stop').addEventListener('click', stop);
  $('#regenerate').addEventListener('click', e => regenerate(e.timeStamp));
  $('#new-chat').addEventListener('click', () => { newConversation(); $('#prompt').focus(); });
  $('#export').addEventListener('click', exportAll);
  $('#columns').addEventListener('mouseover', showTip);
  $('#columns').addEventListener('mouseleave', () => { $('#tip').hidden = true; });
  renderAll();
  loadModels();
  $('#prompt').focus();
}

start();
