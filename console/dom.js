// Small DOM helpers. Text always goes in as text (textContent / text nodes), never as
// HTML: chat history is written by devices and speech servers, not by us.

/**
 * Creates an element. `attrs`: `class`, `text` (textContent), `testid` (data-testid),
 * `dataset` (object), `on` (object of event listeners), `props` (object of DOM
 * properties, e.g. value, checked), anything else as an attribute (true -> empty
 * attribute, null / false / undefined -> left out). Children: nodes, strings (as text),
 * arrays, null / false (skipped).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      switch (k) {
        case 'class':
          el.className = Array.isArray(v) ? v.filter(Boolean).join(' ') : v;
          break;
        case 'text':
          el.textContent = String(v);
          break;
        case 'testid':
          el.dataset.testid = v;
          break;
        case 'dataset':
          for (const [dk, dv] of Object.entries(v)) if (dv != null) el.dataset[dk] = String(dv);
          break;
        case 'on':
          for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
          break;
        case 'props':
          Object.assign(el, v);
          break;
        case 'style':
          throw new Error('inline style attributes are not allowed (CSP)');
        default:
          el.setAttribute(k, v === true ? '' : String(v));
      }
    }
  }
  append(el, children);
  return el;
}

/** Appends children (nodes, strings, arrays; null / false skipped). */
export function append(el, children) {
  for (const c of children) {
    if (c == null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/**
 * What a view holds while it is on screen: listeners, timers and object URLs to let go
 * of when the user navigates away, and `alive` to drop answers that arrive too late.
 */
export class Scope {
  constructor() {
    this.alive = true;
    this.cleanups = [];
  }
  add(fn) {
    if (typeof fn === 'function') this.cleanups.push(fn);
    return fn;
  }
  interval(fn, ms) {
    const id = setInterval(fn, ms);
    this.add(() => clearInterval(id));
    return id;
  }
  timeout(fn, ms) {
    const id = setTimeout(fn, ms);
    this.add(() => clearTimeout(id));
    return id;
  }
  /** A debounced version of `fn` whose pending call is cancelled with the scope. */
  debounce(fn, ms) {
    let id = null;
    this.add(() => clearTimeout(id));
    return (...args) => {
      clearTimeout(id);
      id = setTimeout(() => {
        id = null;
        if (this.alive) fn(...args);
      }, ms);
    };
  }
  dispose() {
    this.alive = false;
    for (const fn of this.cleanups.splice(0).reverse()) {
      try {
        fn();
      } catch (e) {
        console.warn('cleanup failed', e);
      }
    }
  }
}

/** Whether `s` is a MAC address in colon or underscore form. */
export function isMac(s) {
  return /^[0-9a-f]{2}([:_-][0-9a-f]{2}){5}$/i.test(String(s).trim());
}

/** A MAC in colon form, lower case. */
export function normalizeMac(s) {
  return String(s).trim().toLowerCase().replace(/[_-]/g, ':');
}
