// world turnstile:rule/rule@0.1.0
export type Request = import('./interfaces/turnstile-rule-types.js').Request;
export type State = import('./interfaces/turnstile-rule-types.js').State;
export type Outcome = import('./interfaces/turnstile-rule-types.js').Outcome;
export type Level = import('./interfaces/turnstile-rule-types.js').Level;
export type * as TurnstileRuleTypes010 from './interfaces/turnstile-rule-types.js'; // import turnstile:rule/types@0.1.0
/**
* Decides the outcome of `request` for a key whose current state is `current` (`none` when the
* key has never had a transition).
*/
export function handle(current: State | undefined, request: Request): Outcome;
