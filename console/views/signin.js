// Sign-in: the admin token (history.api_token), checked with one cheap authenticated
// call before it is kept (sessionStorage: gone when the tab closes).

import { h, replace } from '../dom.js';
import { t } from '../i18n.js';
import { ApiError, describeError, setToken, verifyToken } from '../api.js';

export function render(container, _params, scope, { onSignedIn, messageKey } = {}) {
  document.title = t('title.signin');
  const input = h('input', {
    id: 'token',
    name: 'token',
    type: 'password',
    class: 'input',
    autocomplete: 'off',
    spellcheck: 'false',
    required: true,
    testid: 'signin-token',
    'aria-describedby': 'token-help signin-error',
  });
  const error = h('p', { id: 'signin-error', class: 'form-error', testid: 'signin-error', role: 'alert', hidden: true });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', testid: 'signin-submit', text: t('signin.submit') });
  const notice = messageKey
    ? h('p', { class: 'notice', testid: 'signin-notice', text: t(messageKey) })
    : null;

  const showError = (text, reason) => {
    error.textContent = text;
    error.dataset.reason = reason;
    error.hidden = false;
    input.setAttribute('aria-invalid', 'true');
  };

  const form = h('form', {
    class: 'signin-form',
    testid: 'signin-form',
    novalidate: true,
    on: {
      submit: async (ev) => {
        ev.preventDefault();
        const token = input.value.trim();
        error.hidden = true;
        input.removeAttribute('aria-invalid');
        if (!token) {
          showError(t('signin.empty'), 'empty');
          input.focus();
          return;
        }
        submit.disabled = true;
        submit.textContent = t('signin.checking');
        try {
          await verifyToken(token);
          if (!scope.alive) return;
          setToken(token);
          onSignedIn();
        } catch (e) {
          if (!scope.alive) return;
          if (e instanceof ApiError && e.status === 401) showError(t('signin.wrong'), 'unauthorized');
          else {
            const d = describeError(e);
            const reason = !(e instanceof ApiError) ? 'unexpected'
              : e.kind === 'network' ? 'network'
                : e.status === 404 && !e.body ? 'api-off' : `http-${e.status}`;
            showError(d.detail ? `${d.message} (${d.detail})` : d.message, reason);
          }
          input.select();
          input.focus();
        } finally {
          submit.disabled = false;
          submit.textContent = t('signin.submit');
        }
      },
    },
  },
  h('label', { for: 'token', class: 'label', text: t('signin.label') }),
  input,
  h('p', { id: 'token-help', class: 'help', text: t('signin.help') }),
  error,
  submit);

  replace(
    container,
    h('section', { class: 'signin card', testid: 'signin' },
      h('h1', { text: t('signin.title') }),
      notice,
      form),
  );
  input.focus();
}
