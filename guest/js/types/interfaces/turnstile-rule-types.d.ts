/** @module Interface turnstile:rule/types@0.1.0 **/
/**
 * One request, as the host routed it to the partition that owns `key`.
 */
export interface Request {
  /**
   * Request id: the client's idempotency id, or one the host made up when the client gave none.
   */
  id: string,
  /**
   * What the request asks for, e.g. `reserve` or `associate`; the rule decides what kinds exist.
   */
  kind: string,
  /**
   * The routing key (the reservation number); for a request that carried only a user, the
   * key the route cache resolved it to.
   */
  key: string,
  /**
   * The identity of the user who sent the request.
   */
  user: string,
  /**
   * The request's payload as JSON text (`null` when the client sent none).
   */
  payload: string,
  /**
   * When the host received the request, in milliseconds since the Unix epoch. The WASI
   * clocks a rule may import read this value too: it is the only time a rule sees, so replay
   * sees the same time.
   */
  receivedAtMs: bigint,
}
/**
 * The state of one key as the host stores it.
 */
export interface State {
  /**
   * The state machine's current status, e.g. `reserved`; never empty.
   */
  status: string,
  /**
   * The user whose request first created this key's state.
   */
  user: string,
  /**
   * The rule's own data for this key, as JSON text.
   */
  data: string,
  /**
   * How many transitions this key has had; the first transition makes version 1.
   */
  version: bigint,
}
/**
 * A decision to move the key to a new state.
 */
export interface Transition {
  /**
   * The new status; must not be empty.
   */
  status: string,
  /**
   * The new data, as JSON text; the host refuses text that is not valid JSON.
   */
  data: string,
}
/**
 * What a rule decides for one request.
 */
export type Outcome = OutcomeTransition | OutcomeReject;
/**
 * Apply the transition: the host stores it and bumps the version.
 */
export interface OutcomeTransition {
  tag: 'transition',
  val: Transition,
}
/**
 * Refuse the request, with a reason meant for the client; the state does not change.
 */
export interface OutcomeReject {
  tag: 'reject',
  val: string,
}
/**
 * How important a log line is.
 * # Variants
 * 
 * ## `"debug"`
 * 
 * Detail for debugging a rule.
 * ## `"info"`
 * 
 * Normal operation.
 * ## `"warn"`
 * 
 * Something looks wrong but the rule carried on.
 * ## `"error"`
 * 
 * Something failed.
 */
export type Level = 'debug' | 'info' | 'warn' | 'error';
