// Every string the console shows, in English and Chinese. The language is the user's
// choice (localStorage), else the browser's (navigator.language); <html lang> follows.
// t('key', {name: value}) fills {name} placeholders.

const STORAGE_KEY = 'xz-console-lang';

const en = {
  'app.title': 'xiaozhi console',
  'nav.skip': 'Skip to content',
  'nav.menu': 'Menu',
  'nav.label': 'Main',
  'nav.fleet': 'Fleet',
  'nav.stats': 'Statistics',
  'nav.export': 'Export',
  'nav.signOut': 'Sign out',
  'lang.switch': 'Switch the language to Chinese',

  'title.signin': 'Sign in · xiaozhi console',
  'title.fleet': 'Fleet · xiaozhi console',
  'title.device': '{mac} · xiaozhi console',
  'title.session': 'Conversation · xiaozhi console',
  'title.stats': 'Statistics · xiaozhi console',
  'title.export': 'Export · xiaozhi console',
  'title.notFound': 'Not found · xiaozhi console',

  'common.loading': 'Loading…',
  'common.retry': 'Try again',
  'common.more': 'More',
  'common.unknown': 'unknown',
  'common.yes': 'yes',
  'common.no': 'no',

  'ws.live': 'live',
  'ws.connecting': 'connecting…',
  'ws.reconnecting': 'reconnecting in {n} s',
  'ws.tooSlow': 'too slow: reconnecting in {n} s',
  'ws.tooSlowHelp': 'The gateway closed the live feed because this page fell behind (close code 1013). It reconnects by itself.',
  'ws.off': 'not connected',

  'signin.title': 'Sign in',
  'signin.label': 'Admin token',
  'signin.help': 'The gateway’s history.api_token (environment variable XZ_HISTORY__API_TOKEN). It is kept in this tab only and sent in a header, never in a URL.',
  'signin.submit': 'Sign in',
  'signin.checking': 'Checking…',
  'signin.empty': 'Enter the admin token.',
  'signin.wrong': 'The gateway refused this token. Check history.api_token (XZ_HISTORY__API_TOKEN) in the gateway’s configuration and try again.',
  'signin.expired': 'The gateway no longer accepts your token (it may have been changed). Sign in again.',
  'signin.signedOut': 'You are signed out.',

  'err.unexpected': 'Something went wrong in the page. Reload it; if it happens again, report it with the detail below.',
  'err.network': 'Cannot reach the gateway. Check that it is running and that this address is right, then try again.',
  'err.badRequest': 'The gateway refused the request as invalid.',
  'err.unauthorized': 'The gateway refused the token. Sign in again.',
  'err.apiOff': 'The console API is not available: chat history is off or history.api_token is not set. Set XZ_HISTORY__API_TOKEN (with history on) and restart the gateway.',
  'err.notFound': 'Not found.',
  'err.conflict': 'Not possible right now.',
  'err.device': 'The device did not answer as expected.',
  'err.unavailable': 'The gateway cannot answer right now (a dependency is down: see the alerts at the top). Try again later.',
  'err.status': 'The gateway answered with HTTP status {status}.',

  'alerts.label': 'Alerts',
  'alerts.allOk': 'All checks pass: database, presence and speech server are reachable.',
  'alerts.checking': 'Checking the gateway’s health…',
  'alerts.unreachable': 'The gateway does not answer /readyz: it may be down or restarting.',
  'alerts.notReady': 'The gateway reports that it is not ready.',
  'alerts.checkFailing': '{name} is failing:',
  'alerts.check.database': 'Chat-history database',
  'alerts.check.presence': 'Presence store',
  'alerts.check.upstream': 'Speech server (upstream)',
  'alerts.help.database': 'Conversations are journaled to disk until it answers again.',
  'alerts.help.presence': 'Device states may be out of date.',
  'alerts.help.upstream': 'New conversations cannot reach xiaozhi-server.',
  'alerts.journal': 'History journal growing: database writes are failing.',
  'alerts.journalBytes': '{n} bytes waiting in the journal; they are written when the database answers again.',
  'alerts.presence': 'The presence store is failing.',
  'alerts.presenceBacklog': '{n} presence updates waiting.',
  'alerts.upstream': 'Speech server failure:',
  'alerts.dismiss': 'Dismiss this alert',

  'state.online': 'Online',
  'state.in_session': 'In conversation',
  'state.in_call': 'In a call',
  'state.offline': 'Offline',
  'state.unknown': 'Unknown',

  'fleet.title': 'Fleet',
  'fleet.count.online': 'Online',
  'fleet.count.onlineHelp': 'connected now',
  'fleet.count.inSession': 'In conversation',
  'fleet.count.inSessionHelp': 'talking now',
  'fleet.count.inCall': 'In a call',
  'fleet.count.inCallHelp': 'device to device',
  'fleet.count.offline': 'Offline',
  'fleet.count.offlineHelp': 'seen today',
  'fleet.search': 'Search',
  'fleet.searchPlaceholder': 'MAC, node, board, firmware, address…',
  'fleet.filter.label': 'State',
  'fleet.filter.all': 'All states',
  'fleet.filter.offlineToday': 'Offline (seen today)',
  'fleet.caption': 'Devices, sorted by MAC address',
  'fleet.col.state': 'State',
  'fleet.col.mac': 'MAC',
  'fleet.col.lastSeen': 'Last seen',
  'fleet.col.node': 'Node',
  'fleet.col.board': 'Board',
  'fleet.col.firmware': 'Firmware',
  'fleet.col.remote': 'Remote address',
  'fleet.more': 'Show more',
  'fleet.showing': '{shown} of {total} devices',
  'fleet.empty': 'No devices yet.',
  'fleet.emptyHelp': 'Devices appear here as soon as they connect to the gateway’s MQTT port. Check their MQTT settings (OTA) if you expected some.',
  'fleet.emptyFiltered': 'No device matches.',
  'fleet.emptyFilteredHelp': 'Clear the search or choose “All states”.',

  'device.badMac': 'Not a MAC address',
  'device.badMacHelp': 'A device address looks like aa:bb:cc:dd:ee:ff. Pick the device in the fleet list.',
  'device.summary': 'Presence',
  'device.f.state': 'State',
  'device.f.node': 'Gateway node',
  'device.f.here': 'Connected to this node',
  'device.f.clientId': 'Client id',
  'device.f.group': 'Group',
  'device.f.remote': 'Remote address',
  'device.f.board': 'Board',
  'device.f.firmware': 'Firmware',
  'device.f.connectedAt': 'Connected since',
  'device.f.sessionSince': 'In conversation since',
  'device.f.callPeer': 'In a call with',
  'device.call.bridged': 'talking',
  'device.call.ringing': 'ringing',
  'device.f.lastSeen': 'Last seen',
  'device.unknownPresence': 'Presence does not know this device.',
  'device.unknownPresenceHelp': 'It has not connected since the gateway started, or it has been offline longer than presence.offline_retention_secs. Its history is below.',
  'device.goodbye': 'End conversation',
  'device.goodbyeTitle': 'End the conversation?',
  'device.goodbyeText': 'The conversation of {mac} ends now and the device gets a goodbye. It stays connected.',
  'device.goodbyeDone': 'The conversation was ended.',
  'device.goodbyeDisabled': 'The device is not in a conversation.',
  'device.kickDisabled': 'The device is not connected.',
  'device.export': 'Export history',
  'device.kick': 'Disconnect',
  'device.kickTitle': 'Disconnect the device?',
  'device.kickText': 'The MQTT connection of {mac} is closed now. The device usually connects again by itself after a while.',
  'device.kickDone': 'The device was disconnected.',
  'device.transcript': 'Live conversation',
  'device.transcriptState.none': 'idle',
  'device.transcriptState.live': 'live',
  'device.transcriptState.ended': 'ended',
  'device.transcriptEmpty': 'Not in a conversation.',
  'device.transcriptEmptyHelp': 'When the device starts talking, what is said appears here as it happens.',
  'device.transcriptWaiting': 'Waiting for the first words…',
  'device.session': 'Session',
  'device.tools': 'Device tools (MCP)',
  'device.noTools': 'No tools to show.',
  'device.noToolsHere': 'Tools are shown while the device is connected to this gateway node. Open this page on the node it is connected to, or wait until it connects.',
  'device.noToolsAnnounced': 'The device announced no MCP tools.',
  'device.stats': 'Last 30 days',
  'device.statsLabel': 'Messages and sessions per day over the last 30 days',
  'device.statsTotals': '{sessions} sessions, {messages} messages, {minutes} minutes of audio',
  'device.sessions': 'Conversations',
  'device.noSessions': 'No conversations recorded.',
  'device.noSessionsHelp': 'Conversations appear here once the device has talked with history recording on (history.mode, or the agent’s chat history setting).',

  'sessions.col.started': 'Started',
  'sessions.col.duration': 'Duration',
  'sessions.col.messages': 'Messages',
  'sessions.col.audio': 'With audio',
  'sessions.breakdown': '({user} user, {assistant} assistant, {tool} tool)',

  'tools.call': 'Call',
  'tools.calling': 'Calling…',
  'tools.result': 'Result:',
  'tools.toolError': 'The tool reported an error:',
  'tools.noArgs': 'No arguments.',
  'tools.min': 'min {n}',
  'tools.max': 'max {n}',
  'tools.default': 'default {v}',
  'tools.unset': '(not set)',
  'tools.required': '{name} is required.',
  'tools.requiredMark': '(required)',
  'tools.notInteger': '{name} must be a whole number.',
  'tools.notNumber': '{name} must be a number.',
  'tools.tooSmall': '{name} must be at least {n}.',
  'tools.tooLarge': '{name} must be at most {n}.',
  'tools.notJson': '{name} must be JSON.',
  'tools.jsonPlaceholder': 'JSON value',
  'tools.elapsed': '{ms} ms',

  'cmd.sending': 'Sending…',
  'cmd.err.device_offline': 'The device is offline: it is not connected to any gateway node.',
  'cmd.err.device_timeout': 'The device did not answer in time. It may be busy or its connection poor; try again.',
  'cmd.err.device_error': 'The device answered with an error.',
  'cmd.err.no_conversation': 'The device is not in a conversation.',
  'cmd.err.busy': 'Too many commands are running on the gateway; try again in a moment.',
  'cmd.err.presence_unavailable': 'The presence store does not answer, so the device cannot be found. See the alerts.',
  'cmd.err.invalid_command': 'The gateway refused the command as invalid.',
  'cmd.err.malformed_json': 'The gateway could not read the command.',
  'cmd.err.unknown_command': 'The gateway does not know this command.',
  'cmd.err.wrong_topic': 'The gateway refused the device address.',
  'cmd.err.other': 'The command failed.',

  'msg.role.user': 'User',
  'msg.role.assistant': 'Assistant',
  'msg.role.tool': 'Tool call',
  'msg.role.other': 'Message',
  'msg.toolCall': 'Tool call: {name}',
  'msg.toolResult': 'Tool result',
  'msg.audio': 'Recording of this utterance',
  'msg.audioLoading': 'Loading audio…',

  'session.title': 'Conversation',
  'session.device': 'Device',
  'session.started': 'Started',
  'session.duration': 'Duration',
  'session.messages': 'Messages',
  'session.counts': '{user} user, {assistant} assistant, {tool} tool',
  'session.audio': 'Recordings',
  'session.empty': 'No messages in this conversation.',
  'session.emptyHelp': 'Check the session id, or wait: messages appear here as they are stored.',
  'session.liveNote': 'New messages appear here as they are stored.',

  'stats.title': 'Statistics',
  'stats.range': 'Range',
  'stats.lastDays': 'Last {n} days',
  'stats.from': 'From',
  'stats.to': 'To',
  'stats.apply': 'Show',
  'stats.needDates': 'Choose both a start and an end date.',
  'stats.fromAfterTo': 'The start date is after the end date.',
  'stats.rangeLabel': '{from} to {to} (days in the gateway’s history time zone)',
  'stats.sessions': 'Sessions',
  'stats.messages': 'Messages',
  'stats.audioMinutes': 'Audio minutes',
  'stats.activityChart': 'Sessions and messages per day',
  'stats.audioChart': 'Audio minutes per day',
  'stats.top': 'Most active devices',
  'stats.noTop': 'No activity in this range.',
  'stats.noTopHelp': 'Choose a longer range, or check that history recording is on.',

  'export.title': 'Export',
  'export.lead': 'Download chat history as a file: everything, one device, a date range, or both.',
  'export.format': 'Format',
  'export.csv': 'CSV (spreadsheets)',
  'export.jsonl': 'JSON Lines (one message per line)',
  'export.mac': 'Device MAC (optional)',
  'export.macHelp': 'Leave empty for every device.',
  'export.badMac': 'That is not a MAC address: write it like aa:bb:cc:dd:ee:ff, or leave it empty.',
  'export.rangeHelp': 'Dates are whole days in the gateway’s history time zone, both included. Leave them empty for all time.',
  'export.download': 'Download',
  'export.preparing': 'Preparing the download…',
  'export.started': 'The {format} download has started; your browser saves it.',

  'chart.missing': 'The chart library did not load (vendor/chart.js). Reload the page.',

  'duration.hms': '{h} h {m} min {s} s',
  'duration.ms': '{m} min {s} s',
  'duration.s': '{s} s',

  'dialog.cancel': 'Cancel',

  'notFound.title': 'No such page',
  'notFound.text': 'The address does not name a console page.',
  'notFound.back': 'Go to the fleet',
};

const zh = {
  'app.title': '小智控制台',
  'nav.skip': '跳到正文',
  'nav.menu': '菜单',
  'nav.label': '主导航',
  'nav.fleet': '设备总览',
  'nav.stats': '统计',
  'nav.export': '导出',
  'nav.signOut': '退出登录',
  'lang.switch': '切换为英文界面',

  'title.signin': '登录 · 小智控制台',
  'title.fleet': '设备总览 · 小智控制台',
  'title.device': '{mac} · 小智控制台',
  'title.session': '对话 · 小智控制台',
  'title.stats': '统计 · 小智控制台',
  'title.export': '导出 · 小智控制台',
  'title.notFound': '页面不存在 · 小智控制台',

  'common.loading': '加载中…',
  'common.retry': '重试',
  'common.more': '更多',
  'common.unknown': '未知',
  'common.yes': '是',
  'common.no': '否',

  'ws.live': '实时',
  'ws.connecting': '连接中…',
  'ws.reconnecting': '{n} 秒后重新连接',
  'ws.tooSlow': '处理过慢：{n} 秒后重新连接',
  'ws.tooSlowHelp': '页面跟不上消息速度，网关关闭了实时连接（关闭码 1013）。页面会自动重新连接。',
  'ws.off': '未连接',

  'signin.title': '登录',
  'signin.label': '管理令牌',
  'signin.help': '即网关配置中的 history.api_token（环境变量 XZ_HISTORY__API_TOKEN）。令牌只保存在当前标签页，通过请求头发送，不会出现在网址中。',
  'signin.submit': '登录',
  'signin.checking': '正在验证…',
  'signin.empty': '请输入管理令牌。',
  'signin.wrong': '网关拒绝了这个令牌。请核对网关配置中的 history.api_token（XZ_HISTORY__API_TOKEN）后重试。',
  'signin.expired': '网关不再接受你的令牌（可能已被更换），请重新登录。',
  'signin.signedOut': '已退出登录。',

  'err.unexpected': '页面出错了。请刷新页面；如果再次出现，请连同下面的详情一起反馈。',
  'err.network': '无法连接网关。请确认网关正在运行、地址正确，然后重试。',
  'err.badRequest': '网关认为请求无效，已拒绝。',
  'err.unauthorized': '网关拒绝了令牌，请重新登录。',
  'err.apiOff': '控制台接口不可用：聊天记录未开启或未设置 history.api_token。请设置 XZ_HISTORY__API_TOKEN（并开启聊天记录）后重启网关。',
  'err.notFound': '未找到。',
  'err.conflict': '当前无法执行。',
  'err.device': '设备没有按预期应答。',
  'err.unavailable': '网关暂时无法应答（有依赖服务不可用，见页面顶部的告警），请稍后重试。',
  'err.status': '网关返回了 HTTP 状态码 {status}。',

  'alerts.label': '告警',
  'alerts.allOk': '所有检查均通过：数据库、在线状态存储和语音服务均可访问。',
  'alerts.checking': '正在检查网关状态…',
  'alerts.unreachable': '网关未响应 /readyz：可能已停止或正在重启。',
  'alerts.notReady': '网关报告尚未就绪。',
  'alerts.checkFailing': '{name}异常：',
  'alerts.check.database': '聊天记录数据库',
  'alerts.check.presence': '在线状态存储',
  'alerts.check.upstream': '语音服务（上游）',
  'alerts.help.database': '恢复之前，对话记录会先写入磁盘日志。',
  'alerts.help.presence': '设备状态可能不是最新的。',
  'alerts.help.upstream': '新的对话无法连接 xiaozhi-server。',
  'alerts.journal': '聊天记录日志在增长：数据库写入失败。',
  'alerts.journalBytes': '日志中有 {n} 字节等待写入，数据库恢复后会自动写入。',
  'alerts.presence': '在线状态存储出现故障。',
  'alerts.presenceBacklog': '{n} 条状态更新等待写入。',
  'alerts.upstream': '语音服务故障：',
  'alerts.dismiss': '关闭此告警',

  'state.online': '在线',
  'state.in_session': '对话中',
  'state.in_call': '通话中',
  'state.offline': '离线',
  'state.unknown': '未知',

  'fleet.title': '设备总览',
  'fleet.count.online': '在线',
  'fleet.count.onlineHelp': '当前已连接',
  'fleet.count.inSession': '对话中',
  'fleet.count.inSessionHelp': '正在对话',
  'fleet.count.inCall': '通话中',
  'fleet.count.inCallHelp': '设备间通话',
  'fleet.count.offline': '离线',
  'fleet.count.offlineHelp': '今天出现过',
  'fleet.search': '搜索',
  'fleet.searchPlaceholder': 'MAC、节点、板型、固件、地址…',
  'fleet.filter.label': '状态',
  'fleet.filter.all': '全部状态',
  'fleet.filter.offlineToday': '离线（今天出现过）',
  'fleet.caption': '设备列表，按 MAC 地址排序',
  'fleet.col.state': '状态',
  'fleet.col.mac': 'MAC',
  'fleet.col.lastSeen': '最后在线',
  'fleet.col.node': '节点',
  'fleet.col.board': '板型',
  'fleet.col.firmware': '固件',
  'fleet.col.remote': '远程地址',
  'fleet.more': '显示更多',
  'fleet.showing': '已显示 {shown} / {total} 台设备',
  'fleet.empty': '还没有设备。',
  'fleet.emptyHelp': '设备连接到网关的 MQTT 端口后会立即出现在这里。如果应该有设备，请检查它们的 MQTT 配置（OTA）。',
  'fleet.emptyFiltered': '没有匹配的设备。',
  'fleet.emptyFilteredHelp': '请清空搜索内容，或选择“全部状态”。',

  'device.badMac': '不是有效的 MAC 地址',
  'device.badMacHelp': '设备地址的格式类似 aa:bb:cc:dd:ee:ff。请在设备总览中选择设备。',
  'device.summary': '在线状态',
  'device.f.state': '状态',
  'device.f.node': '网关节点',
  'device.f.here': '连接在本节点',
  'device.f.clientId': '客户端 ID',
  'device.f.group': '分组',
  'device.f.remote': '远程地址',
  'device.f.board': '板型',
  'device.f.firmware': '固件',
  'device.f.connectedAt': '连接时间',
  'device.f.sessionSince': '对话开始时间',
  'device.f.callPeer': '通话对方',
  'device.call.bridged': '通话中',
  'device.call.ringing': '呼叫中',
  'device.f.lastSeen': '最后在线',
  'device.unknownPresence': '在线状态中没有这台设备。',
  'device.unknownPresenceHelp': '网关启动后它还没有连接过，或离线时间已超过 presence.offline_retention_secs。它的聊天记录见下方。',
  'device.goodbye': '结束对话',
  'device.goodbyeTitle': '结束这次对话？',
  'device.goodbyeText': '{mac} 的当前对话将立即结束，设备会收到 goodbye 消息，但保持连接。',
  'device.goodbyeDone': '对话已结束。',
  'device.goodbyeDisabled': '设备当前不在对话中。',
  'device.kickDisabled': '设备未连接。',
  'device.export': '导出聊天记录',
  'device.kick': '断开连接',
  'device.kickTitle': '断开这台设备？',
  'device.kickText': '{mac} 的 MQTT 连接将立即关闭。设备通常会在一段时间后自动重新连接。',
  'device.kickDone': '设备已断开连接。',
  'device.transcript': '实时对话',
  'device.transcriptState.none': '空闲',
  'device.transcriptState.live': '进行中',
  'device.transcriptState.ended': '已结束',
  'device.transcriptEmpty': '当前没有对话。',
  'device.transcriptEmptyHelp': '设备开始对话后，对话内容会实时显示在这里。',
  'device.transcriptWaiting': '等待第一句话…',
  'device.session': '会话',
  'device.tools': '设备工具（MCP）',
  'device.noTools': '没有可显示的工具。',
  'device.noToolsHere': '设备连接在本网关节点时才会显示工具。请在它所连接的节点上打开此页面，或等待它连接。',
  'device.noToolsAnnounced': '设备没有声明任何 MCP 工具。',
  'device.stats': '最近 30 天',
  'device.statsLabel': '最近 30 天每天的消息数和会话数',
  'device.statsTotals': '{sessions} 个会话，{messages} 条消息，{minutes} 分钟录音',
  'device.sessions': '对话记录',
  'device.noSessions': '没有对话记录。',
  'device.noSessionsHelp': '开启聊天记录（history.mode 或智能体的聊天记录设置）后，设备的对话会出现在这里。',

  'sessions.col.started': '开始时间',
  'sessions.col.duration': '时长',
  'sessions.col.messages': '消息',
  'sessions.col.audio': '含录音',
  'sessions.breakdown': '（用户 {user}，助手 {assistant}，工具 {tool}）',

  'tools.call': '调用',
  'tools.calling': '调用中…',
  'tools.result': '结果：',
  'tools.toolError': '工具返回了错误：',
  'tools.noArgs': '无参数。',
  'tools.min': '最小 {n}',
  'tools.max': '最大 {n}',
  'tools.default': '默认 {v}',
  'tools.unset': '（不设置）',
  'tools.required': '{name} 为必填项。',
  'tools.requiredMark': '（必填）',
  'tools.notInteger': '{name} 必须是整数。',
  'tools.notNumber': '{name} 必须是数字。',
  'tools.tooSmall': '{name} 不能小于 {n}。',
  'tools.tooLarge': '{name} 不能大于 {n}。',
  'tools.notJson': '{name} 必须是 JSON。',
  'tools.jsonPlaceholder': 'JSON 值',
  'tools.elapsed': '{ms} 毫秒',

  'cmd.sending': '发送中…',
  'cmd.err.device_offline': '设备离线：没有连接到任何网关节点。',
  'cmd.err.device_timeout': '设备没有及时应答，可能正忙或网络不好，请重试。',
  'cmd.err.device_error': '设备返回了错误。',
  'cmd.err.no_conversation': '设备当前不在对话中。',
  'cmd.err.busy': '网关上正在执行的命令过多，请稍后重试。',
  'cmd.err.presence_unavailable': '在线状态存储无响应，无法找到设备。请查看告警。',
  'cmd.err.invalid_command': '网关认为命令无效，已拒绝。',
  'cmd.err.malformed_json': '网关无法解析命令。',
  'cmd.err.unknown_command': '网关不认识这个命令。',
  'cmd.err.wrong_topic': '网关拒绝了这个设备地址。',
  'cmd.err.other': '命令执行失败。',

  'msg.role.user': '用户',
  'msg.role.assistant': '助手',
  'msg.role.tool': '工具调用',
  'msg.role.other': '消息',
  'msg.toolCall': '工具调用：{name}',
  'msg.toolResult': '工具结果',
  'msg.audio': '这句话的录音',
  'msg.audioLoading': '正在加载录音…',

  'session.title': '对话',
  'session.device': '设备',
  'session.started': '开始时间',
  'session.duration': '时长',
  'session.messages': '消息',
  'session.counts': '用户 {user}，助手 {assistant}，工具 {tool}',
  'session.audio': '录音',
  'session.empty': '这次对话没有消息。',
  'session.emptyHelp': '请检查会话 ID，或稍候：消息保存后会显示在这里。',
  'session.liveNote': '新消息保存后会自动显示在这里。',

  'stats.title': '统计',
  'stats.range': '时间范围',
  'stats.lastDays': '最近 {n} 天',
  'stats.from': '开始日期',
  'stats.to': '结束日期',
  'stats.apply': '查看',
  'stats.needDates': '请选择开始日期和结束日期。',
  'stats.fromAfterTo': '开始日期晚于结束日期。',
  'stats.rangeLabel': '{from} 至 {to}（按网关聊天记录所用时区计算日期）',
  'stats.sessions': '会话',
  'stats.messages': '消息',
  'stats.audioMinutes': '录音分钟数',
  'stats.activityChart': '每天的会话和消息',
  'stats.audioChart': '每天的录音分钟数',
  'stats.top': '最活跃的设备',
  'stats.noTop': '这段时间没有活动。',
  'stats.noTopHelp': '请选择更长的时间范围，或确认已开启聊天记录。',

  'export.title': '导出',
  'export.lead': '把聊天记录下载为文件：全部、某台设备、某个日期范围，或两者结合。',
  'export.format': '格式',
  'export.csv': 'CSV（电子表格）',
  'export.jsonl': 'JSON Lines（每行一条消息）',
  'export.mac': '设备 MAC（可选）',
  'export.macHelp': '留空则导出所有设备。',
  'export.badMac': '这不是有效的 MAC 地址：请写成 aa:bb:cc:dd:ee:ff 的形式，或留空。',
  'export.rangeHelp': '日期按网关聊天记录所用时区的整天计算，包含起止两天。留空则导出全部时间。',
  'export.download': '下载',
  'export.preparing': '正在准备下载…',
  'export.started': '{format} 文件已开始下载，浏览器会保存它。',

  'chart.missing': '图表库没有加载（vendor/chart.js），请刷新页面。',

  'duration.hms': '{h}小时{m}分{s}秒',
  'duration.ms': '{m}分{s}秒',
  'duration.s': '{s}秒',

  'dialog.cancel': '取消',

  'notFound.title': '页面不存在',
  'notFound.text': '这个地址不对应任何控制台页面。',
  'notFound.back': '返回设备总览',
};

export const dictionaries = { en, 'zh-CN': zh };

function initialLang() {
  try {
    const saved = localStorage.getItem(STORAGE_KEY);
    if (saved && dictionaries[saved]) return saved;
  } catch {
    /* storage unavailable */
  }
  const nav = (navigator.languages && navigator.languages[0]) || navigator.language || 'en';
  return nav.toLowerCase().startsWith('zh') ? 'zh-CN' : 'en';
}

let lang = initialLang();
document.documentElement.lang = lang;
const listeners = new Set();

export function getLang() {
  return lang;
}

/** The locale for Intl: the browser's own variant of the chosen language when it has one. */
export function locale() {
  const prefix = lang === 'zh-CN' ? 'zh' : 'en';
  const list = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language];
  return list.find((l) => l && l.toLowerCase().startsWith(prefix)) || lang;
}

export function setLang(next) {
  if (!dictionaries[next] || next === lang) return;
  lang = next;
  try {
    localStorage.setItem(STORAGE_KEY, next);
  } catch {
    /* kept for this page only */
  }
  document.documentElement.lang = next;
  for (const fn of [...listeners]) fn(next);
}

/** Calls `fn` after every language change; returns the unsubscribe function. */
export function onLangChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function fill(s, params) {
  if (!params) return s;
  return s.replace(/\{(\w+)\}/g, (m, k) => (k in params ? String(params[k]) : m));
}

/** The string for `key` in the current language (English, then the key, when missing). */
export function t(key, params) {
  const s = dictionaries[lang][key] ?? en[key];
  if (s === undefined) {
    console.warn(`i18n: no string for ${key}`);
    return key;
  }
  return fill(s, params);
}

/** Like t, but '' when there is no such string (for optional texts). */
export function tMaybe(key, params) {
  const s = dictionaries[lang][key] ?? en[key];
  return s === undefined ? '' : fill(s, params);
}

/** Translates the static page: data-i18n (text) and data-i18n-aria (aria-label). */
export function applyStatic(root) {
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll('[data-i18n-aria]')) el.setAttribute('aria-label', t(el.dataset.i18nAria));
  document.title = t('app.title');
}
