// Catraca console: a read-mostly view of the audit trail and the keys, for operators.
//
// Served by the gateway under a strict Content-Security-Policy (script-src 'self', no inline script or
// style), so this file builds every element with the DOM API and sets text with textContent only:
// nothing the server returns is ever parsed as HTML. The API key lives in sessionStorage (this tab
// only) and is sent as `Authorization: Bearer <key>` on every call; a 401 from any call signs out.
'use strict';

(() => {
  const KEY_NAME = 'catraca.key';
  const TABS = ['trace', 'decisions', 'chains', 'keys'];
  const EFFECTS = new Set(['allow', 'deny']);
  // Members every event has; the generic renderer shows the others.
  const ENVELOPE = new Set([
    'event_id', 'event_type', 'chain_id', 'seq', 'prev_hash', 'hash', 'trace_id', 'occurred_at',
    'instance_id', 'decision_id',
  ]);
  const DECISIONS_PAGE = 50;

  const $ = (id) => document.getElementById(id);

  // ---- state -------------------------------------------------------------------------------------------
  let apiKey = null;
  let keysAllowed = false;
  let currentTab = null;
  // A generation number per view: a response that arrives after a newer request (or a sign-out) is
  // dropped instead of overwriting what the newer one shows.
  const gen = { signin: 0, trace: 0, decisions: 0, chains: 0, keys: 0, probe: 0 };
  const decisions = { query: '', next: null, shown: 0, loaded: false };

  // ---- small DOM helpers -------------------------------------------------------------------------------
  /** An element: `el('td', {cls: 'num', text: '3', title: '…', data: {keyId: '…'}}, child, …)`. */
  function el(tag, opts = {}, ...children) {
    const node = document.createElement(tag);
    if (opts.cls) {
      for (const c of String(opts.cls).split(/\s+/)) if (c) node.classList.add(c);
    }
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.title) node.title = String(opts.title);
    if (opts.type) node.type = opts.type;
    if (opts.data) {
      for (const [k, v] of Object.entries(opts.data)) {
        if (v !== undefined && v !== null) node.dataset[k] = String(v);
      }
    }
    if (opts.attrs) {
      for (const [k, v] of Object.entries(opts.attrs)) {
        if (v !== undefined && v !== null) node.setAttribute(k, String(v));
      }
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const dash = (v) => (v === undefined || v === null || v === '' ? '-' : v);

  /** A JSON value as short text: lists joined with commas, objects as compact JSON. */
  function valueText(v) {
    if (v === undefined || v === null || v === '') return '-';
    if (Array.isArray(v)) {
      if (v.length === 0) return '-';
      if (v.every((i) => i === null || typeof i !== 'object')) return v.map(String).join(', ');
      return JSON.stringify(v);
    }
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }

  function timeEl(ts) {
    if (typeof ts !== 'string' || ts === '') return el('span', { cls: 'muted', text: '-' });
    return el('time', { text: ts.replace('T', ' '), attrs: { datetime: ts } });
  }

  /** Microseconds as milliseconds with three decimals. */
  function fmtUs(us) {
    return typeof us === 'number' && Number.isFinite(us) ? `${(us / 1000).toFixed(3)} ms` : '?';
  }

  /** RFC 3339 time as microseconds since the epoch, keeping the fraction Date.parse would cut to ms. */
  function micros(ts) {
    if (typeof ts !== 'string') return NaN;
    const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/i.exec(ts.trim());
    if (!m) return NaN;
    const whole = Date.parse(m[1] + m[3]);
    if (Number.isNaN(whole)) return NaN;
    const frac = m[2] ? Number((m[2] + '000000').slice(0, 6)) : 0;
    return whole * 1000 + frac;
  }

  /** Reason codes as a row of code badges (or a dash). */
  function codeList(codes, cls = 'reason-code') {
    const list = Array.isArray(codes) ? codes.filter((c) => c !== null && c !== undefined) : [];
    if (list.length === 0) return el('span', { cls: 'muted', text: '-' });
    return el('span', { cls: 'codes' }, list.map((c) => el('code', { cls, text: c })));
  }

  function effectBadge(effect) {
    const e = typeof effect === 'string' ? effect.toLowerCase() : '';
    return el('span', { cls: `effect ${EFFECTS.has(e) ? e : 'unknown'}`, text: e ? e.toUpperCase() : '?' });
  }

  function traceLink(id) {
    if (typeof id !== 'string' || id === '') return el('span', { cls: 'muted', text: '-' });
    const b = el('button', { type: 'button', cls: 'link trace-link', text: id, data: { traceId: id } });
    b.addEventListener('click', () => openTrace(id));
    return b;
  }

  function setBusy(node, busy) {
    node.dataset.state = busy ? 'loading' : 'ready';
    node.setAttribute('aria-busy', busy ? 'true' : 'false');
  }

  // ---- errors ------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body, traceId, fallback) {
      const b = body && typeof body === 'object' && !Array.isArray(body) ? body : {};
      const message = [b.message, b.error, fallback].find((m) => typeof m === 'string' && m !== '');
      super(message || (status ? `HTTP ${status}` : 'request failed'));
      this.status = status;
      this.codes = Array.isArray(b.reason_codes) ? b.reason_codes.map(String) : [];
      // Without reason codes, the error kind (e.g. GATE_DENIED) is the next best code to show.
      if (this.codes.length === 0 && typeof b.error === 'string' && /^[A-Z][A-Z0-9_]*$/.test(b.error)) {
        this.codes = [b.error];
      }
      this.traceId = (typeof b.trace_id === 'string' && b.trace_id) || traceId || null;
    }
  }

  function localError(message) {
    return new ApiError(0, null, null, message);
  }

  function showError(box, err, prefix) {
    box.replaceChildren();
    if (!err) {
      box.hidden = true;
      return;
    }
    const status = err.status ? el('span', { cls: 'status', text: `HTTP ${err.status}` }) : null;
    const codes = err.codes && err.codes.length
      ? el('span', { cls: 'codes' }, err.codes.map((c) => el('code', { cls: 'reason-code', text: c })))
      : null;
    const line = el('p', { cls: 'error-line' }, prefix ? el('strong', { text: prefix }) : null, status,
      codes, el('span', { cls: 'message', text: err.message }));
    box.append(line);
    if (err.traceId) {
      box.append(el('p', { cls: 'error-trace' }, 'trace id ', el('code', { cls: 'trace-id', text: err.traceId })));
    }
    box.hidden = false;
  }

  // ---- the API -----------------------------------------------------------------------------------------
  /**
   * Calls the gateway with the key (the signed-in one unless `key` is given). Resolves to the JSON body
   * of a 2xx answer; rejects with an ApiError otherwise. A 401 with the signed-in key signs out.
   */
  async function api(path, { method = 'GET', body, key } = {}) {
    const usedKey = key === undefined ? apiKey : key;
    let resp;
    try {
      const headers = new Headers({ Accept: 'application/json' });
      headers.set('Authorization', `Bearer ${usedKey}`);
      const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
      if (body !== undefined) {
        headers.set('Content-Type', 'application/json');
        init.body = JSON.stringify(body);
      }
      resp = await fetch(path, init);
    } catch (e) {
      throw localError(`the gateway could not be reached or the request could not be sent (${e.message})`);
    }
    const headerTrace = resp.headers.get('X-Trace-Id');
    const text = await resp.text().catch(() => '');
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!resp.ok) {
      const fallback = text && !data ? text.slice(0, 300) : resp.statusText;
      const err = new ApiError(resp.status, data, headerTrace, fallback);
      if (resp.status === 401 && key === undefined && apiKey !== null && usedKey === apiKey) {
        signOut(err);
      }
      throw err;
    }
    if (data === null || typeof data !== 'object') {
      throw new ApiError(resp.status, null, headerTrace, 'the gateway answered without a JSON body');
    }
    return data;
  }

  // ---- sign-in -----------------------------------------------------------------------------------------
  function readStoredKey() {
    try {
      return sessionStorage.getItem(KEY_NAME);
    } catch {
      return null;
    }
  }

  function storeKey(key) {
    try {
      if (key === null) sessionStorage.removeItem(KEY_NAME);
      else sessionStorage.setItem(KEY_NAME, key);
    } catch {
      // Storage refused (private mode, quota): the key then lives in this page only.
    }
  }

  function keyIdOf(key) {
    const m = /^ck_([^_]+)_/.exec(key || '');
    return m ? m[1] : null;
  }

  async function signIn(key) {
    const g = ++gen.signin;
    const submit = $('signin-submit');
    submit.disabled = true;
    document.body.dataset.state = 'checking';
    showError($('signin-error'), null);
    try {
      await api('/v1/audit/chains', { key });
    } catch (err) {
      if (g !== gen.signin) return;
      // A remembered key the gateway no longer accepts is forgotten.
      if (err.status === 401 && readStoredKey() === key) storeKey(null);
      submit.disabled = false;
      showSignedOut();
      showError($('signin-error'), err, 'Not signed in:');
      $('api-key').select();
      return;
    }
    if (g !== gen.signin) return;
    submit.disabled = false;
    apiKey = key;
    storeKey(key);
    $('api-key').value = '';
    const id = keyIdOf(key);
    $('who-key').textContent = id ? `key ${id}` : 'signed in';
    $('who').hidden = false;
    $('signin').hidden = true;
    $('console').hidden = false;
    document.body.dataset.state = 'signed-in';
    await probeKeys();
    if (apiKey !== key) return;
    if (!applyHash()) showTab(currentTab && (currentTab !== 'keys' || keysAllowed) ? currentTab : 'trace');
  }

  /** GET /v1/keys decides whether the Keys tab is shown: 200 yes, anything else no. */
  async function probeKeys() {
    const g = ++gen.probe;
    document.body.dataset.keys = 'pending';
    let allowed = false;
    try {
      await api('/v1/keys');
      allowed = true;
    } catch (err) {
      if (err.status !== 403 && err.status !== 401) {
        console.warn('GET /v1/keys:', err.status, err.codes.join(', '), err.message);
      }
    }
    if (g !== gen.probe || apiKey === null) return;
    keysAllowed = allowed;
    $('tab-keys').hidden = !allowed;
    document.body.dataset.keys = allowed ? 'allowed' : 'forbidden';
  }

  function showSignedOut() {
    $('console').hidden = true;
    $('who').hidden = true;
    $('signin').hidden = false;
    document.body.dataset.state = 'signed-out';
  }

  /** Forgets the key and everything shown with it; `err` (the reason, e.g. a 401) is shown. */
  function signOut(err) {
    apiKey = null;
    keysAllowed = false;
    storeKey(null);
    for (const k of Object.keys(gen)) gen[k] += 1;
    resetViews();
    $('tab-keys').hidden = true;
    document.body.dataset.keys = 'unknown';
    $('who-key').textContent = '';
    $('signin-submit').disabled = false;
    showSignedOut();
    showError($('signin-error'), err || null, err ? 'Signed out:' : undefined);
    $('api-key').value = '';
    $('api-key').focus();
  }

  function resetViews() {
    // Requests cut short by the sign-out never reach their `finally`: their buttons are freed here.
    $('decisions-older').disabled = false;
    $('trace-form').reset();
    showError($('trace-error'), null);
    $('trace-result').hidden = true;
    $('timeline').replaceChildren();
    delete $('timeline').dataset.traceId;
    $('timeline-text').textContent = '';
    $('panel-trace').dataset.state = 'idle';

    $('decisions-form').reset();
    showError($('decisions-error'), null);
    $('decisions').tBodies[0].replaceChildren();
    $('decisions').dataset.state = 'idle';
    delete $('decisions').dataset.query;
    $('decisions-note').textContent = '';
    $('decisions-older').hidden = true;
    Object.assign(decisions, { query: '', next: null, shown: 0, loaded: false });

    showError($('chains-error'), null);
    $('verification').replaceChildren();
    $('chains').tBodies[0].replaceChildren();
    $('chains-note').textContent = '';
    $('panel-chains').dataset.state = 'idle';

    showError($('keys-error'), null);
    $('keys').tBodies[0].replaceChildren();
    $('keys-note').replaceChildren();
    $('keys-note').hidden = true;
    $('panel-keys').dataset.state = 'idle';

    for (const t of TABS) {
      $(`panel-${t}`).hidden = true;
      $(`tab-${t}`).classList.remove('active');
      $(`tab-${t}`).removeAttribute('aria-current');
    }
    currentTab = null;
  }

  // ---- navigation --------------------------------------------------------------------------------------
  function showTab(name, { updateHash = true } = {}) {
    if (!TABS.includes(name) || (name === 'keys' && !keysAllowed)) name = 'trace';
    currentTab = name;
    for (const t of TABS) {
      const active = t === name;
      $(`panel-${t}`).hidden = !active;
      $(`tab-${t}`).classList.toggle('active', active);
      if (active) $(`tab-${t}`).setAttribute('aria-current', 'page');
      else $(`tab-${t}`).removeAttribute('aria-current');
    }
    if (updateHash) {
      const shown = $('timeline').dataset.traceId;
      setHash(name === 'trace' && shown ? `#trace=${encodeURIComponent(shown)}` : `#${name}`);
    }
    if (name === 'decisions' && !decisions.loaded) loadDecisions();
    if (name === 'chains') loadChains();
    if (name === 'keys') loadKeys();
    if (name === 'trace') $('trace-input').focus();
  }

  function setHash(hash) {
    if (location.hash !== hash) history.replaceState(null, '', hash);
  }

  /** Opens what the URL hash names (`#trace=<id>`, `#decisions`, …); false when it names nothing. */
  function applyHash() {
    if (apiKey === null) return false;
    const hash = location.hash.replace(/^#/, '');
    if (hash.startsWith('trace=')) {
      let id;
      try {
        id = decodeURIComponent(hash.slice('trace='.length));
      } catch {
        id = hash.slice('trace='.length);
      }
      openTrace(id);
      return true;
    }
    if (TABS.includes(hash)) {
      showTab(hash);
      return true;
    }
    return false;
  }

  function openTrace(id) {
    showTab('trace', { updateHash: false });
    $('trace-input').value = id;
    searchTrace(id);
  }

  // ---- Trace -------------------------------------------------------------------------------------------
  async function searchTrace(raw) {
    const id = String(raw || '').trim();
    const panel = $('panel-trace');
    if (!id) {
      showError($('trace-error'), localError('enter a trace id'));
      return;
    }
    const g = ++gen.trace;
    setHash(`#trace=${encodeURIComponent(id)}`);
    setBusy(panel, true);
    showError($('trace-error'), null);
    try {
      const data = await api(`/v1/audit/traces/${encodeURIComponent(id)}`);
      if (g !== gen.trace) return;
      renderTrace(id, data);
      setBusy(panel, false);
    } catch (err) {
      if (g !== gen.trace || apiKey === null) return;
      if (err.status === 404) err.message = 'no audit events for this trace id';
      $('trace-result').hidden = true;
      $('timeline').replaceChildren();
      $('timeline').dataset.traceId = id;
      showError($('trace-error'), err);
      panel.dataset.state = 'error';
      panel.setAttribute('aria-busy', 'false');
    }
  }

  function renderTrace(id, data) {
    const events = Array.isArray(data.events) ? data.events.filter((e) => e && typeof e === 'object') : [];
    const t0 = events.length ? micros(events[0].occurred_at) : NaN;
    const chains = [...new Set(events.map((e) => e.chain_id).filter(Boolean))];
    $('trace-summary').replaceChildren(
      'trace ', el('code', { cls: 'trace-id', text: data.trace_id || id }),
      ` · ${events.length} event${events.length === 1 ? '' : 's'}`,
      chains.length ? ` · chain ${chains.join(', ')}` : '',
      events.length ? ' · started ' : '', events.length ? timeEl(events[0].occurred_at) : '',
    );
    const list = $('timeline');
    list.replaceChildren(...events.map((ev) => eventItem(ev, t0)));
    list.dataset.traceId = id;
    const raw = $('timeline-raw');
    if (typeof data.timeline === 'string' && data.timeline !== '') {
      $('timeline-text').textContent = data.timeline;
      raw.hidden = false;
    } else {
      $('timeline-text').textContent = '';
      raw.hidden = true;
    }
    $('trace-result').hidden = false;
  }

  function fact(label, value, cls) {
    const v = value instanceof Node ? value : el('span', { text: valueText(value) });
    v.classList.add('v');
    return el('span', { cls: `fact${cls ? ` ${cls}` : ''}` }, el('span', { cls: 'k', text: label }), v);
  }

  function eventItem(ev, t0) {
    const type = typeof ev.event_type === 'string' && ev.event_type ? ev.event_type : 'UNKNOWN';
    const at = micros(ev.occurred_at);
    const ms = (at - t0) / 1000;
    const offset = Number.isNaN(ms) ? '?' : `${ms < 0 ? '-' : '+'}${Math.abs(ms).toFixed(3)} ms`;
    const li = el('li', { cls: 'event', data: { eventType: type, seq: ev.seq } });
    const head = el('div', { cls: 'event-head' },
      el('span', { cls: 'offset', text: offset, title: typeof ev.occurred_at === 'string' ? ev.occurred_at : '' }),
      el('span', { cls: 'seq', text: ev.seq === undefined || ev.seq === null ? '#?' : `#${ev.seq}` }),
      el('span', { cls: 'etype', text: type }));
    li.append(head);
    const body = el('div', { cls: 'facts' });
    switch (type) {
      case 'REQUEST_START':
        body.append(
          fact('request', `${dash(ev.method)} ${dash(ev.route)}`),
          fact('from', ev.client_addr));
        break;
      case 'DECISION':
        renderDecisionEvent(ev, li, head, body);
        break;
      case 'EXECUTOR_SELECTED':
        body.append(
          fact('executor', ev.executor_id),
          fact('kind', ev.executor_kind),
          fact('timeout', typeof ev.timeout_ms === 'number' ? `${ev.timeout_ms} ms` : ev.timeout_ms));
        break;
      case 'STEP_EXECUTED':
        markStatus(li, ev.status);
        body.append(
          fact('step', ev.step),
          fact('action', ev.action),
          fact('executor', ev.executor_id),
          fact('status', ev.status, 'status'),
          fact('duration', fmtUs(ev.duration_us)));
        if (Array.isArray(ev.reason_codes) && ev.reason_codes.length) body.append(fact('reasons', codeList(ev.reason_codes)));
        if (ev.error) body.append(fact('error', ev.error, 'error-text'));
        break;
      case 'ACTION_EXECUTED':
        markStatus(li, ev.status);
        body.append(
          fact('executor', ev.executor_id),
          fact('status', ev.status, 'status'),
          fact('duration', fmtUs(ev.duration_us)));
        if (ev.error) body.append(fact('error', ev.error, 'error-text'));
        break;
      case 'REQUEST_END':
        if (typeof ev.status === 'number' && ev.status >= 400) li.classList.add('failed');
        body.append(
          fact('HTTP', ev.status, 'status'),
          fact('outcome', ev.outcome),
          fact('duration', fmtUs(ev.duration_us)));
        break;
      default:
        for (const [k, v] of Object.entries(ev)) {
          if (!ENVELOPE.has(k)) body.append(fact(k.replace(/_/g, ' '), v));
        }
    }
    li.append(body);
    li.append(el('details', { cls: 'raw' }, el('summary', { text: 'event' }),
      el('pre', { text: JSON.stringify(ev, null, 2) })));
    return li;
  }

  function markStatus(li, status) {
    if (typeof status === 'string' && status !== '' && status.toUpperCase() !== 'SUCCESS') li.classList.add('failed');
  }

  function renderDecisionEvent(ev, li, head, body) {
    const effect = typeof ev.effect === 'string' ? ev.effect.toLowerCase() : '';
    if (EFFECTS.has(effect)) li.classList.add(effect);
    if (typeof ev.gate === 'string') li.dataset.gate = ev.gate;
    head.append(effectBadge(effect), el('span', { cls: 'by', text: 'by gate' }),
      el('code', { cls: 'gate', text: dash(ev.gate) }));
    const principal = ev.principal && typeof ev.principal === 'object' ? ev.principal : null;
    const action = ev.action || (ev.requested_action ? `${ev.requested_action} (unknown to the policy)` : null);
    body.append(
      fact('action', action),
      fact('context', ev.context_id),
      fact('key', (principal && principal.key_id) || ev.presented_key_id),
      fact('role', principal ? principal.role : 'unauthenticated'));
    if (principal && principal.name) body.append(fact('key name', principal.name));
    const detail = el('div', { cls: 'decision-detail' },
      fact('reasons', codeList(ev.reason_codes), 'reasons'),
      fact('rules', codeList(ev.determining_rules, 'rule'), 'rules'),
      fact('policy revision', el('code', { cls: 'revision', text: dash(ev.policy_revision) })));
    if (ev.payload && typeof ev.payload === 'object') {
      detail.append(fact('payload', `${dash(ev.payload.size_bytes)} bytes, sha256 ${dash(ev.payload.sha256)}`));
    }
    body.append(detail);
    const gates = Array.isArray(ev.gates) ? ev.gates.filter((g) => g && typeof g === 'object') : [];
    if (gates.length) {
      const rows = gates.map((g) => {
        const verdict = typeof g.verdict === 'string' ? g.verdict.toLowerCase() : '';
        return el('tr', { cls: EFFECTS.has(verdict) ? `verdict-${verdict}` : '' },
          el('td', {}, el('code', { text: dash(g.gate) })),
          el('td', {}, effectBadge(verdict)),
          el('td', { cls: 'num', text: fmtUs(g.duration_us) }),
          el('td', {}, codeList(g.reason_codes)));
      });
      body.append(el('div', { cls: 'table-wrap gates-wrap' }, el('table', { cls: 'gates' },
        el('thead', {}, el('tr', {},
          el('th', { text: 'Gate', attrs: { scope: 'col' } }),
          el('th', { text: 'Verdict', attrs: { scope: 'col' } }),
          el('th', { text: 'Duration', cls: 'num', attrs: { scope: 'col' } }),
          el('th', { text: 'Reason codes', attrs: { scope: 'col' } }))),
        el('tbody', {}, rows))));
    }
  }

  // ---- Decisions ---------------------------------------------------------------------------------------
  function decisionFilters() {
    const params = new URLSearchParams();
    const pairs = [['effect', 'f-effect'], ['gate', 'f-gate'], ['reason', 'f-reason'], ['action', 'f-action'],
      ['key_id', 'f-key']];
    for (const [name, id] of pairs) {
      const v = $(id).value.trim();
      if (v) params.set(name, v);
    }
    return params;
  }

  async function loadDecisions({ older = false } = {}) {
    const table = $('decisions');
    const tbody = table.tBodies[0];
    if (older && !decisions.next) return;
    const params = older ? new URLSearchParams(decisions.query) : decisionFilters();
    if (!older) {
      decisions.query = params.toString();
      decisions.next = null;
      decisions.shown = 0;
      tbody.replaceChildren();
      $('decisions-note').textContent = '';
      $('decisions-older').hidden = true;
    }
    params.set('limit', String(DECISIONS_PAGE));
    if (older) params.set('before', decisions.next);
    const g = ++gen.decisions;
    decisions.loaded = true;
    table.dataset.query = decisions.query;
    setBusy(table, true);
    // Apply stays usable (a newer query supersedes this one); Older waits, so no page is appended twice.
    $('decisions-older').disabled = true;
    showError($('decisions-error'), null);
    try {
      const data = await api(`/v1/audit/decisions?${params.toString()}`);
      if (g !== gen.decisions) return;
      const rows = Array.isArray(data.decisions) ? data.decisions.filter((d) => d && typeof d === 'object') : [];
      tbody.append(...rows.map(decisionRow));
      decisions.shown += rows.length;
      decisions.next = typeof data.next === 'string' && data.next !== '' ? data.next : null;
      $('decisions-older').hidden = decisions.next === null;
      $('decisions-note').textContent = decisionsNote(rows.length, data.scanned);
      setBusy(table, false);
    } catch (err) {
      if (g !== gen.decisions || apiKey === null) return;
      showError($('decisions-error'), err);
      table.dataset.state = 'error';
      table.setAttribute('aria-busy', 'false');
    } finally {
      if (g === gen.decisions) $('decisions-older').disabled = false;
    }
  }

  function decisionsNote(pageRows, scanned) {
    const n = typeof scanned === 'number' ? scanned : '?';
    if (pageRows === 0 && decisions.next) {
      return `no match among the ${n} events examined; Older continues further back`;
    }
    if (pageRows === 0) {
      return decisions.shown === 0
        ? `no matching decisions (${n} events examined)`
        : `no more matching decisions (${n} events examined)`;
    }
    const shown = `${decisions.shown} decision${decisions.shown === 1 ? '' : 's'} shown, newest first`;
    return `${shown}; ${n} events examined for the last page${decisions.next ? '; Older continues further back' : ''}`;
  }

  function decisionRow(d) {
    const effect = typeof d.effect === 'string' ? d.effect.toLowerCase() : '';
    const revision = typeof d.policy_revision === 'string' ? d.policy_revision : '';
    const where = d.chain_id ? `chain ${d.chain_id}, seq ${dash(d.seq)}` : '';
    return el('tr', { cls: `decision${EFFECTS.has(effect) ? ` ${effect}` : ''}`, title: where,
      data: { traceId: d.trace_id, effect } },
    el('td', { cls: 'time' }, timeEl(d.occurred_at)),
    el('td', { cls: 'stack' }, effectBadge(effect), el('code', { cls: 'gate', text: dash(d.gate) })),
    el('td', {}, codeList(d.reason_codes)),
    el('td', { cls: 'stack' }, el('span', { cls: 'action', text: dash(d.action) }),
      el('span', { cls: 'context muted', text: d.context_id ? `in ${d.context_id}` : '' })),
    el('td', { cls: 'stack' }, el('code', { cls: 'key-id', text: dash(d.key_id) }),
      d.role ? el('span', { cls: 'role', text: d.role }) : null),
    el('td', {}, codeList(d.determining_rules, 'rule')),
    el('td', {}, revision
      ? el('code', { cls: 'revision short', text: revision.slice(0, 8), title: revision })
      : el('span', { cls: 'muted', text: '-' })),
    el('td', { cls: 'trace' }, traceLink(d.trace_id)));
  }

  // ---- Chains ------------------------------------------------------------------------------------------
  async function loadChains() {
    const panel = $('panel-chains');
    const g = ++gen.chains;
    setBusy(panel, true);
    showError($('chains-error'), null);
    try {
      const data = await api('/v1/audit/chains');
      if (g !== gen.chains) return;
      renderVerification(data.last_verification);
      const chains = Array.isArray(data.chains) ? data.chains.filter((c) => c && typeof c === 'object') : [];
      $('chains').tBodies[0].replaceChildren(...chains.map((c) => el('tr', { cls: 'chain', data: { chainId: c.chain_id } },
        el('td', {}, el('code', { text: dash(c.chain_id) })),
        el('td', { cls: 'num', text: dash(c.events) }),
        el('td', {}, timeEl(c.first_at)))));
      const total = chains.reduce((sum, c) => sum + (typeof c.events === 'number' ? c.events : 0), 0);
      $('chains-note').textContent = chains.length
        ? `${chains.length} chain${chains.length === 1 ? '' : 's'}, ${total} events`
        : 'no chains yet';
      setBusy(panel, false);
    } catch (err) {
      if (g !== gen.chains || apiKey === null) return;
      showError($('chains-error'), err);
      panel.dataset.state = 'error';
      panel.setAttribute('aria-busy', 'false');
    }
  }

  function renderVerification(v) {
    const box = $('verification');
    box.classList.remove('ok', 'failed', 'never');
    if (!v || typeof v !== 'object') {
      box.classList.add('never');
      box.replaceChildren(el('p', {}, 'never verified: run ', el('code', { text: 'catraca audit verify' })));
      return;
    }
    const ok = v.ok === true;
    box.classList.add(ok ? 'ok' : 'failed');
    const parts = [
      el('p', { cls: 'headline' },
        el('span', { cls: `badge ${ok ? 'ok' : 'failed'}`, text: ok ? 'INTACT' : 'FAILED' }),
        ' last verification ', timeEl(v.verified_at)),
      el('p', {}, `${dash(v.chains)} chains, ${dash(v.events)} events checked in ${dash(v.duration_ms)} ms`,
        v.source ? ` (source: ${v.source})` : ''),
    ];
    const failures = Array.isArray(v.failures) ? v.failures : [];
    if (failures.length) {
      parts.push(el('ul', { cls: 'failures' }, failures.map((f) => el('li', { text: valueText(f) }))));
    }
    box.replaceChildren(...parts);
  }

  // ---- Keys --------------------------------------------------------------------------------------------
  async function loadKeys() {
    const panel = $('panel-keys');
    const g = ++gen.keys;
    setBusy(panel, true);
    showError($('keys-error'), null);
    try {
      const data = await api('/v1/keys');
      if (g !== gen.keys) return;
      const keys = Array.isArray(data.keys) ? data.keys.filter((k) => k && typeof k === 'object') : [];
      $('keys').tBodies[0].replaceChildren(...keys.map(keyRow));
      setBusy(panel, false);
    } catch (err) {
      if (g !== gen.keys || apiKey === null) return;
      showError($('keys-error'), err);
      panel.dataset.state = 'error';
      panel.setAttribute('aria-busy', 'false');
    }
  }

  function keyState(k) {
    const when = (ts) => String(ts).replace('T', ' ');
    if (k.revoked_at) return { text: `revoked ${when(k.revoked_at)}`, cls: 'revoked', active: false };
    if (k.expires_at) {
      const at = Date.parse(k.expires_at);
      if (!Number.isNaN(at) && at <= Date.now()) return { text: `expired ${when(k.expires_at)}`, cls: 'expired', active: false };
      return { text: `expires ${when(k.expires_at)}`, cls: 'active', active: true };
    }
    return { text: 'active', cls: 'active', active: true };
  }

  function keyRow(k) {
    const state = keyState(k);
    const list = Array.isArray(k.contexts) ? k.contexts : [];
    const contexts = list.length === 0 || list.includes('*') ? 'every context' : list.join(', ');
    const actions = el('td', { cls: 'actions' });
    if (state.active && typeof k.key_id === 'string') {
      const button = el('button', { type: 'button', cls: 'revoke danger', text: 'Revoke' });
      button.addEventListener('click', () => showRevokeForm(k.key_id, actions));
      actions.append(button);
    }
    return el('tr', { cls: `key ${state.cls}`, data: { keyId: k.key_id, state: state.cls } },
      el('td', {}, el('code', { cls: 'key-id', text: dash(k.key_id) })),
      el('td', {}, dash(k.name), k.key_id && k.key_id === keyIdOf(apiKey)
        ? el('span', { cls: 'you', text: ' (this session)' }) : null),
      el('td', { text: dash(k.role) }),
      el('td', { text: contexts }),
      el('td', { text: dash(k.tier) }),
      el('td', {}, timeEl(k.created_at)),
      el('td', { cls: 'state', text: state.text }),
      el('td', {}, k.rotated_from ? el('code', { text: k.rotated_from }) : el('span', { cls: 'muted', text: '-' })),
      actions);
  }

  function showRevokeForm(keyId, cell) {
    const input = el('input', { cls: 'revoke-reason', type: 'text',
      attrs: { 'aria-label': `Reason for revoking key ${keyId}`, placeholder: 'reason', title: 'recorded in the audit trail',
        maxlength: '500', autocomplete: 'off', spellcheck: 'false' } });
    const confirm = el('button', { type: 'submit', cls: 'revoke-confirm danger', text: 'Confirm revoke' });
    const cancel = el('button', { type: 'button', cls: 'revoke-cancel secondary', text: 'Cancel' });
    const form = el('form', { cls: 'revoke-form', attrs: { novalidate: '' } }, input, confirm, cancel);
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      revokeKey(keyId, input.value, form);
    });
    cancel.addEventListener('click', () => loadKeys());
    cell.replaceChildren(form);
    input.focus();
  }

  async function revokeKey(keyId, rawReason, form) {
    const reason = String(rawReason || '').trim();
    if (!reason) {
      showError($('keys-error'), localError('a reason is required to revoke a key'));
      return;
    }
    for (const b of form.querySelectorAll('button, input')) b.disabled = true;
    showError($('keys-error'), null);
    const note = $('keys-note');
    note.hidden = true;
    try {
      const r = await api(`/v1/keys/${encodeURIComponent(keyId)}/revoke`, { method: 'POST', body: { reason } });
      if (apiKey === null) return;
      note.replaceChildren(
        'Key ', el('code', { text: dash(r.key_id || keyId) }), ' revoked',
        r.revoked_at ? ' at ' : '', r.revoked_at ? timeEl(r.revoked_at) : '',
        r.revoked_by ? ` by ${r.revoked_by}` : '', '. Reason: ', el('q', { text: dash(r.reason || reason) }),
        typeof r.bound_ms === 'number' ? `. Every gateway refuses it within ${r.bound_ms} ms` : '',
        r.trace_id ? '. Trace: ' : '', r.trace_id ? traceLink(r.trace_id) : '');
      note.hidden = false;
    } catch (err) {
      if (apiKey === null) return;
      showError($('keys-error'), err, `Key ${keyId} not revoked:`);
      for (const b of form.querySelectorAll('button, input')) b.disabled = false;
      return;
    }
    await loadKeys();
  }

  // ---- wiring ------------------------------------------------------------------------------------------
  function init() {
    $('signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const key = $('api-key').value.trim();
      if (!key) {
        showError($('signin-error'), localError('enter an API key'));
        return;
      }
      signIn(key);
    });
    $('signout').addEventListener('click', () => {
      signOut(null);
      setHash(location.pathname + location.search);
    });
    for (const t of TABS) {
      $(`tab-${t}`).addEventListener('click', () => {
        if (t === 'keys') {
          $('keys-note').hidden = true;
        }
        showTab(t);
      });
    }
    $('trace-form').addEventListener('submit', (e) => {
      e.preventDefault();
      searchTrace($('trace-input').value);
    });
    $('decisions-form').addEventListener('submit', (e) => {
      e.preventDefault();
      loadDecisions();
    });
    $('decisions-older').addEventListener('click', () => loadDecisions({ older: true }));
    window.addEventListener('hashchange', () => applyHash());

    document.body.dataset.keys = 'unknown';
    const stored = readStoredKey();
    if (stored) {
      signIn(stored);
    } else {
      showSignedOut();
      $('api-key').focus();
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
