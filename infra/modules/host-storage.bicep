// Host storage account: AzureWebJobsStorage (host locks, function keys, blob-trigger receipts,
// diagnostic events) and the Flex Consumption deployment package container. It is a separate
// account from the data account so that the broad rights the Functions host needs on its own
// storage (it creates containers, queues and tables on demand) never extend to the models or
// the utilities' batch files.

@description('Azure region.')
param location string

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param name string

@description('Container that holds the deployment package (functionAppConfig.deployment.storage).')
param deploymentContainerName string = 'app-package'

@description('Principal id of the Function App identity.')
param principalId string

@description('Redundancy: Standard_ZRS when the plan is zone-redundant (Microsoft recommends zone-redundant storage for a zone-redundant app).')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
])
param sku string = 'Standard_LRS'

@description('Network isolation: firewall on; the app reaches the account through private endpoints.')
param vnetEnabled bool = false

@description('With vnetEnabled: public IP ranges (CIDR) still allowed.')
param allowedIpRanges array = []

@description('Tags for every resource.')
param tags object = {}

var firewall = {
  defaultAction: 'Deny'
  bypass: 'AzureServices'
  ipRules: [for range in allowedIpRanges: {
    value: range
    action: 'Allow'
  }]
}
var open = {
  defaultAction: 'Allow'
  bypass: 'AzureServices'
}

// Built-in role definition ids (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var storageBlobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: sku
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: vnetEnabled ? firewall : open
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Blob Data Owner: the host reads and writes the deployment package, keys (azure-webjobs-secrets)
// and leases/receipts (azure-webjobs-hosts) and creates those containers itself.
resource hostBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, storageBlobDataOwner)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwner)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// Queue Data Contributor: identity-based AzureWebJobsStorage needs queues for the blob trigger's
// internal work items and for host coordination.
resource hostQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, storageQueueDataContributor)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// Table Data Contributor: the host writes its diagnostic events to Table storage (AZFD0003 otherwise).
resource hostTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, storageTableDataContributor)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output id string = account.id
output name string = account.name
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output tableEndpoint string = account.properties.primaryEndpoints.table
output deploymentContainerName string = deploymentContainer.name
