// The subscription's Activity Log to the stage's Log Analytics workspace, so that every change to
// the resources (who deployed, changed an app setting, deleted a role assignment, removed the
// lock, ...) is kept and queryable beside the app's telemetry (AzureActivity table).
// Subscription scope: the deployer needs Microsoft.Insights/diagnosticSettings/write on the
// subscription (docs/DEPLOYMENT_GUIDE.md, 1.3); main.bicep `activityLogEnabled` turns it off.
// A subscription holds at most five diagnostic settings: one per stage here.
// https://learn.microsoft.com/azure/azure-monitor/essentials/activity-log (export with a diagnostic setting)
targetScope = 'subscription'

@description('Name of the diagnostic setting (unique in the subscription).')
param name string

@description('Resource id of the Log Analytics workspace.')
param workspaceId string

var categories = [
  'Administrative'
  'Security'
  'ServiceHealth'
  'Alert'
  'Recommendation'
  'Policy'
  'Autoscale'
  'ResourceHealth'
]

resource activityLog 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: name
  properties: {
    workspaceId: workspaceId
    logs: [for category in categories: {
      category: category
      enabled: true
    }]
  }
}
