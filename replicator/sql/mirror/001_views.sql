-- The analytics layer on the mirror: the deployment doc's v_invoice_summary,
-- receivables aging, open tasks, pending expenses and the function n8n calls.
-- Over the mirror tables as the replicator builds them (the source's Odoo 17
-- column names and types); `replicator init` creates those tables first.
--
-- security_invoker: a view reads the tables as the one who queries it, so the
-- row-level security policy on the mirror tables governs the views too (a
-- view owned by the replicator would otherwise read past it).
-- Grants are not here: init grants every view and function to
-- [destination] analytics_roles on each run.
--
-- {mirror} is the mirror schema, {state} the state schema; a literal brace is
-- written doubled.

-- As in the deployment doc (Superset).
create view {mirror}.v_invoice_summary with (security_invoker = true) as
select m.id,
       m.name as invoice_number,
       m.invoice_date,
       m.amount_total,
       p.name as partner_name
from {mirror}.account_move m
join {mirror}.res_partner p on m.partner_id = p.id
where m.move_type in ('out_invoice', 'out_refund');

-- What each customer owes, by how long past due: posted customer invoices and
-- refunds with something left to pay, in company currency (the *_signed
-- amounts: a refund counts negative), bucketed by days past invoice_date_due.
create view {mirror}.v_receivables_aging with (security_invoker = true) as
select m.partner_id,
       p.name as partner_name,
       count(*) as open_moves,
       coalesce(sum(m.amount_residual_signed) filter (
           where m.invoice_date_due is null or m.invoice_date_due >= current_date), 0) as not_due,
       coalesce(sum(m.amount_residual_signed) filter (
           where current_date - m.invoice_date_due between 1 and 30), 0) as days_1_30,
       coalesce(sum(m.amount_residual_signed) filter (
           where current_date - m.invoice_date_due between 31 and 60), 0) as days_31_60,
       coalesce(sum(m.amount_residual_signed) filter (
           where current_date - m.invoice_date_due between 61 and 90), 0) as days_61_90,
       coalesce(sum(m.amount_residual_signed) filter (
           where current_date - m.invoice_date_due > 90), 0) as days_over_90,
       sum(m.amount_residual_signed) as total_due
from {mirror}.account_move m
left join {mirror}.res_partner p on p.id = m.partner_id
where m.move_type in ('out_invoice', 'out_refund')
  and m.state = 'posted'
  and m.amount_residual_signed <> 0
group by m.partner_id, p.name;

-- Tasks still to do: active, not done or cancelled (Odoo 17's task states
-- 1_done and 1_canceled are the closed ones).
create view {mirror}.v_open_tasks with (security_invoker = true) as
select t.id,
       t.name,
       t.project_id,
       t.stage_id,
       t.partner_id,
       p.name as partner_name,
       t.state,
       t.priority,
       t.date_deadline,
       t.date_deadline < localtimestamp as overdue
from {mirror}.project_task t
left join {mirror}.res_partner p on p.id = t.partner_id
where t.active and t.state not in ('1_done', '1_canceled');

-- Expense reports waiting for someone: submitted (to approve) or approved (to
-- post), with their number of expense lines.
create view {mirror}.v_pending_expenses with (security_invoker = true) as
select s.id,
       s.name,
       s.employee_id,
       s.state,
       s.total_amount,
       s.currency_id,
       s.accounting_date,
       s.create_date,
       coalesce(e.expense_count, 0) as expense_count
from {mirror}.hr_expense_sheet s
left join (select sheet_id, count(*) as expense_count
           from {mirror}.hr_expense group by sheet_id) e on e.sheet_id = s.id
where s.state in ('submit', 'approve');

-- The deployment doc's n8n call (POST /rest/v1/rpc/get_pending_expenses with
-- the odoo_mirror profile). Security invoker: the caller's grants and the
-- row-level security policy apply.
create function {mirror}.get_pending_expenses()
returns setof {mirror}.v_pending_expenses
language sql stable
as $$
    select * from {mirror}.v_pending_expenses order by create_date, id
$$;
revoke execute on function {mirror}.get_pending_expenses() from public;
