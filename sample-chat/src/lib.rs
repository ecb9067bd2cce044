//! A small chat on a gateway group, and the page that uses it.
//!
//! Loaded by a `protocol = "websocket"` group it handles the chat; loaded
//! by an HTTP group of the same host it serves the page at `/` (the
//! setting `websocket` is the address the page connects to, default
//! `ws://<the page's host>:8282/`). With `push = "<the chat group>"` on the
//! HTTP group, `POST /notify?uid=NAME` sends its body to NAME's clients and
//! `GET /online` counts the chat's clients. Commands, one per message:
//!
//! - `nick NAME`: binds the client to the uid NAME;
//! - `join ROOM`: leaves the current room, joins ROOM, tells the room;
//! - `say TEXT`: to everyone in the room;
//! - `to NAME TEXT`: to every client of the uid NAME;
//! - `count ROOM`: how many clients are in ROOM; `online`: in the chat;
//! - `shout TEXT`: to every client but the sender; `tell ID TEXT`: to the
//!   client ID only (a send to all with an include list);
//! - `whois ID`: whether ID is online, and its nickname (its session);
//! - `kick NAME`: closes NAME's clients (code 4000);
//! - `leave`: leaves the room; `forget`: drops the nickname;
//! - `version`: which build answers (`CHAT_VERSION` at build time, default
//!   the crate's version), to see a reload take effect in an open page.
//!
//! The nickname and room live in the client's session (`name\nroom`),
//! which the gateway keeps across reloads of this handler.

use handler_api::{export_handler, gateway, Client, Context, Gateway, Handler, Request, Response};

const VERSION: &str = match option_env!("CHAT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

const PAGE: &str = include_str!("page.html");

struct Chat {
    page: String,
}

/// Who a client is, as kept in its session.
#[derive(Default)]
struct Member {
    name: String,
    room: String,
}

impl Member {
    fn of(session: &[u8]) -> Member {
        let text = String::from_utf8_lossy(session);
        let (name, room) = text.split_once('\n').unwrap_or((&text, ""));
        Member {
            name: name.to_owned(),
            room: room.to_owned(),
        }
    }

    fn save(&self, gateway: &Gateway, client: &Client<'_>) {
        gateway.set_session(
            client.id(),
            format!("{}\n{}", self.name, self.room).as_bytes(),
        );
    }

    fn shown(&self, client: &Client<'_>) -> String {
        if self.name.is_empty() {
            client.id().to_string()
        } else {
            self.name.clone()
        }
    }
}

impl Handler for Chat {
    fn start(ctx: &Context<'_>) -> Result<Self, String> {
        let websocket = ctx.setting("websocket").unwrap_or("");
        Ok(Chat {
            page: PAGE.replace("{{websocket}}", websocket),
        })
    }

    fn handle(&self, req: &Request<'_>) -> Response {
        match (req.method(), req.path()) {
            ("GET", "/") => {
                Response::new(200, self.page.clone()).with_content_type("text/html; charset=utf-8")
            }
            ("POST", "/notify") => match (gateway(), req.query_param("uid")) {
                (Some(gateway), Some(uid)) => {
                    let text = String::from_utf8_lossy(req.body());
                    gateway.send_to_uid(uid, &*text);
                    Response::text(200, "sent\n")
                }
                (None, _) => Response::text(503, "this group does not push to the chat\n"),
                (_, None) => Response::text(400, "which uid?\n"),
            },
            ("GET", "/online") => match gateway() {
                Some(gateway) => {
                    Response::text(200, &format!("online: {}\n", gateway.client_count()))
                }
                None => Response::text(503, "this group does not push to the chat\n"),
            },
            _ => Response::text(404, "not found\n"),
        }
    }

    fn on_connect(&self, gateway: &Gateway, client: &Client<'_>) {
        gateway.send_to_client(
            client.id(),
            &format!("welcome {} (chat {VERSION})", client.id()),
        );
    }

    fn on_message(&self, gateway: &Gateway, client: &Client<'_>) {
        let Some(text) = client.message().as_text() else {
            return;
        };
        let mut member = Member::of(client.session());
        let (command, rest) = text.split_once(' ').unwrap_or((text, ""));
        let reply = |text: &str| gateway.send_to_client(client.id(), text);
        match command {
            "nick" if !rest.is_empty() => {
                if !member.name.is_empty() {
                    gateway.unbind_uid(client.id(), &member.name);
                }
                member.name = rest.to_owned();
                gateway.bind_uid(client.id(), rest);
                member.save(gateway, client);
                reply(&format!("you are {rest}"));
            }
            "join" if !rest.is_empty() => {
                if !member.room.is_empty() {
                    gateway.leave_group(client.id(), &member.room);
                }
                member.room = rest.to_owned();
                gateway.join_group(client.id(), rest);
                member.save(gateway, client);
                let here = gateway.group_client_count(rest);
                gateway.send_to_group(
                    rest,
                    &format!("* {} joined {rest} ({here} here)", member.shown(client)),
                    &[],
                );
            }
            "say" if !member.room.is_empty() => gateway.send_to_group(
                &member.room,
                &format!("{}: {rest}", member.shown(client)),
                &[],
            ),
            "to" => match rest.split_once(' ') {
                Some((uid, words)) if gateway.is_uid_online(uid) => {
                    let line = format!("{} (private): {words}", member.shown(client));
                    gateway.send_to_uid(uid, &line);
                }
                _ => reply("nobody by that name"),
            },
            "shout" => gateway.send_to_all_but(
                &format!("{} shouts: {rest}", member.shown(client)),
                None,
                &[client.id()],
            ),
            "tell" => match rest.split_once(' ').map(|(id, words)| (id.parse(), words)) {
                Some((Ok(id), words)) => gateway.send_to_all_but(
                    &format!("{} (to you): {words}", member.shown(client)),
                    Some(&[id]),
                    &[],
                ),
                _ => reply("tell needs a client id"),
            },
            "whois" => match rest.parse() {
                Ok(id) if gateway.is_online(id) => {
                    let session = gateway.session(id).unwrap_or_default();
                    reply(&format!("{rest} is online as {}", Member::of(&session).name));
                }
                _ => reply(&format!("{rest} is not online")),
            },
            "kick" => {
                for id in gateway.client_ids_of_uid(rest) {
                    gateway.close_client(id, 4000, "kicked");
                }
            }
            "leave" if !member.room.is_empty() => {
                gateway.leave_group(client.id(), &member.room);
                reply(&format!("you left {}", member.room));
                member.room.clear();
                member.save(gateway, client);
            }
            "forget" if !member.name.is_empty() => {
                gateway.unbind_uid(client.id(), &member.name);
                member.name.clear();
                member.save(gateway, client);
                reply("you are nobody");
            }
            "count" => reply(&format!("{rest}: {}", gateway.group_client_count(rest))),
            "online" => reply(&format!("online: {}", gateway.client_count())),
            "version" => reply(&format!("chat {VERSION}")),
            _ => reply("commands: nick, join, say, to, count, online, shout, tell, whois, kick, leave, forget, version"),
        }
    }

    fn on_close(&self, gateway: &Gateway, client: &Client<'_>) {
        let member = Member::of(client.session());
        if !member.room.is_empty() {
            gateway.send_to_group(
                &member.room,
                &format!("* {} left", member.shown(client)),
                &[client.id()],
            );
        }
    }
}

export_handler!(Chat, version = VERSION);
